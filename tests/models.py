"""Small real architectures for the model-level tests (random init, nothing downloaded)."""

import torch
from torch import nn


def tiny_bert(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=num_labels)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def resnet18(seed: int = 0):
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=1000).eval()


def mlp(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(19, 45), nn.ReLU(), nn.Linear(45, 33), nn.ReLU(), nn.Linear(33, 5))
