"""Fine-tuning tasks: one module per benchmark (its official files, its head, its loss, its
official metric); the loop that runs them is vlp/finetune/loop.py."""
