"""Fine-tuning: the backbone built from a pretrained model directory (backbone.py), the visual
inputs of benchmark images (visual.py), the task interface and fine-tuned model directory
(task.py) and the one loop (loop.py). Tasks live in vlp/tasks."""
