"""Fine-tune DeepSeek-OCR with LoRA the PyTorch Lightning way."""

__version__ = "0.1.0"
