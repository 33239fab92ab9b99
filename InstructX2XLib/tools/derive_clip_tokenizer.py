"""Derive the Hugging Face CLIP tokenizer files from OpenAI's BPE merge list.

Stable Diffusion's tokenizer (openai/clip-vit-large-patch14) is fully determined by the
BPE merge list ``bpe_simple_vocab_16e6.txt.gz`` that OpenAI's CLIP and open-clip-torch ship
(MIT licence). Deriving ``vocab.json`` and ``merges.txt`` from it lets the library build
the exact tokenizer offline, without a model hub.

Usage: python derive_clip_tokenizer.py BPE_GZ OUTPUT_DIR
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

# CLIP keeps the first 48,894 merges of the file (49152 - 256 - 2); the first line is a header.
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map (the GPT-2 scheme)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def derive(bpe_gz: Path, output_dir: Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs into ``output_dir``."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [token + "</w>" for token in byte_tokens]
    vocab += ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "vocab.json").write_text(
        json.dumps({token: index for index, token in enumerate(vocab)}, ensure_ascii=False)
    )
    (output_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (output_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(
        special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer", errors="replace"
    )
    (output_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    derive(Path(sys.argv[1]), Path(sys.argv[2]))
