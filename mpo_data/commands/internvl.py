"""Flags of InternVL's reasoning_data_pipeline scripts that have no setting here: accepted, and each one
given is answered with one stderr line saying what it does here, so the guide's commands run unchanged.
(Flags that do mean something here are aliases of our fields: --checkpoint, --tp, --session-len, ...)"""

from __future__ import annotations

import argparse
import sys

# flag -> (argparse type, or None for a switch; what it does here)
SAMPLING_FLAGS: dict[str, tuple[type | None, str]] = {
    "--num-workers": (
        int,
        "InternVL's DataLoader processes; here each engine actor reads and decodes its own "
        "images, and --num-engines sets how many run at once: no effect",
    ),
    "--vit-batch-size": (
        int,
        "lmdeploy's vision-encoder batch; vLLM schedules the vision encoder with each batch itself: no effect",
    ),
    "--cache-max-entry-count": (
        float,
        "lmdeploy's KV-cache share of free GPU memory; vLLM's memory share is --gpu-memory-utilization: no effect",
    ),
}
POSTPROCESS_FLAGS: dict[str, tuple[type | None, str]] = {
    "--overwrite": (
        None,
        "pair files are always rebuilt here (atomically), so there is nothing to overwrite: no effect",
    ),
    "--force": (
        None,
        "InternVL merges extra ground-truth chains (M3CoT) into items that have correct samples; "
        "there are none to merge here: no effect",
    ),
    "--use-correctness-cache": (
        None,
        "every sample is judged here (repeated answers are judged once, cached): "
        "stored is_correct values are not reused; no effect",
    ),
}


def _dest(flag: str) -> str:
    return "internvl_" + flag.lstrip("-").replace("-", "_")


def add_flags(parser: argparse.ArgumentParser, flags: dict[str, tuple[type | None, str]]) -> None:
    group = parser.add_argument_group("InternVL script flags with no effect here (accepted for its guide's commands)")
    for flag, (kind, note) in flags.items():
        if kind is None:
            group.add_argument(flag, dest=_dest(flag), action="store_true", help=note)
        else:
            group.add_argument(
                flag, dest=_dest(flag), type=kind, metavar=flag.lstrip("-").upper().replace("-", "_"), help=note
            )


def report_given(args: argparse.Namespace, flags: dict[str, tuple[type | None, str]]) -> None:
    """One stderr line per InternVL-only flag the command line gave."""
    for flag, (_, note) in flags.items():
        if getattr(args, _dest(flag), None) not in (None, False):
            print(f"note: {flag}: {note}", file=sys.stderr)
