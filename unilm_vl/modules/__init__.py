"""Plain nn.Modules configured by dataclasses; no fairseq import here."""
