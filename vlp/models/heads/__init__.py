"""Task heads on top of a fine-tuning backbone (vlp/finetune/backbone.py): each is an
nn.Module whose forward(backbone, **inputs) runs the backbone and returns the task's outputs."""
