"""Text from a train.py checkpoint, with the model and tokenizer the checkpoint records.

    python -m tritongpt.sample out/ckpt.pt
    python -m tritongpt.sample out/ckpt.pt --prompt "Return the" --tokens 300 --num-samples 3
"""
import argparse
import sys

import torch

from tritongpt.trainer import checkpoint, sampling


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tritongpt.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a ckpt.pt written by train.py")
    p.add_argument("--prompt", help="text to continue (default: the prompt train.py samples with)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate per sample (default 200)")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kernels", default="auto", help='as train.py\'s --kernels (default "auto")')
    args = p.parse_args(argv)
    if args.tokens < 1 or args.num_samples < 1 or not args.temperature > 0:
        p.error("--tokens and --num-samples must be at least 1, --temperature positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt = checkpoint.load(args.checkpoint)
        device = torch.device(args.device)
        model = sampling.model_from_checkpoint(ckpt, device, args.kernels)
        codec = sampling.codec_from_checkpoint(ckpt)
    except (checkpoint.CheckpointError, ValueError, RuntimeError) as err:
        sys.exit(f"tritongpt.sample: {err}")
    prompt = args.prompt if args.prompt is not None else sampling.default_prompt(argparse.Namespace(**ckpt["args"]))
    texts = sampling.sample_texts(model, codec, prompt, args.num_samples, args.tokens, args.seed, device,
                                  args.temperature, args.top_k)
    for text in texts:
        print(text + "\n" + "-" * 40, flush=True)
    return texts


if __name__ == "__main__":
    main()
