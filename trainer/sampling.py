"""Text from a model: the samples train.py prints and `python -m tritongpt.sample` writes."""
import contextlib

import torch

from tritongpt.model.gpt import GPT, GPTConfig
from tritongpt.trainer import data


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def default_prompt(args):
    return "The " if args.data == "demo" else "Hello, I'm a language model,"


def sample_texts(model, codec, prompt, count, length, seed, device, temperature=0.8, top_k=40):
    """count continuations of prompt, drawn from an RNG of their own so that sampling never
    changes a training run's random numbers."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        idx = torch.tensor([codec.encode(prompt)] * count, device=device)
        with autocast(device):
            out = model.generate(idx, max_new_tokens=length, temperature=temperature, top_k=top_k)
    model.train(was_training)
    return [codec.decode(row) for row in out.tolist()]


def model_from_checkpoint(ckpt, device, kernels="auto"):
    """The GPT a checkpoint holds, on device, with the kernels choice given (not the saved one:
    a run trained on a GPU with kernels "all" samples on a CPU too)."""
    config = GPTConfig(**{**ckpt["config"], "kernels": kernels})
    model = GPT(config)
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def codec_from_checkpoint(ckpt):
    """The tokenizer of the run that wrote ckpt."""
    import argparse
    saved = argparse.Namespace(**{"tokenizer_dir": None, **ckpt["args"]})
    return data.codec(saved)
