"""Habana's autocast op lists, set before torch is imported.

Habana's PyTorch bridge reads ``PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST`` / ``..._FP32_OPS_LIST`` (older releases:
``LOWER_LIST`` / ``FP32_LIST``) once, when it loads, and from Gaudi software 1.18 on ``import torch`` loads it
(autoload). So train.py and finetune.py import this module before anything that imports torch: with ``--hpus``
on their command line it points the variables at the op lists that ``--autocast-bf16`` / ``--autocast-fp32``
name (the recipe's by default), as the scripts did later on (too late under autoload). Standard library only.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

AUTOCAST_VARS = (("PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST", "PT_HPU_AUTOCAST_FP32_OPS_LIST"),
                 ("LOWER_LIST", "FP32_LIST"))
SCRIPT_DIR = Path(__file__).resolve().parents[1]
TORCH_WAS_LOADED = "torch" in sys.modules  # at this module's import: must be False in train.py / finetune.py


def op_lists(argv: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(bf16 list, fp32 list) that a command line with ``--hpus`` asks for; None without ``--hpus``."""
    if not any(arg == "--hpus" or arg.startswith("--hpus=") for arg in argv):
        return None
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--autocast-bf16", default="ops_bf16_hubert.txt")
    parser.add_argument("--autocast-fp32", default="ops_fp32_hubert.txt")
    known, _ = parser.parse_known_args(argv)
    return str(SCRIPT_DIR / known.autocast_bf16), str(SCRIPT_DIR / known.autocast_fp32)


def set_op_lists(bf16_file: str, fp32_file: str) -> None:
    for lower, fp32 in AUTOCAST_VARS:
        os.environ[lower] = bf16_file
        os.environ[fp32] = fp32_file


def op_lists_in_effect(bf16_file: str, fp32_file: str) -> bool:
    return all(os.environ.get(lower) == bf16_file and os.environ.get(fp32) == fp32_file
               for lower, fp32 in AUTOCAST_VARS)


_lists = op_lists(sys.argv[1:])
if _lists is not None:
    set_op_lists(*_lists)
