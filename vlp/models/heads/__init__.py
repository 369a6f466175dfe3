"""Task heads on top of the joint encoder (vlp/models/joint.py): each is an nn.Module whose
forward(encoder, **inputs) runs the encoder and returns the task's outputs."""
