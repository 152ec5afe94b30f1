"""MPO training recipe: meta.json mixture -> TRL DPOTrainer (sigmoid + bco_pair + sft) -> adapter/model -> eval.json.

Same as `mpo-data train`, as a script for launchers:
    python training/train_mpo.py --config training/configs/smollm2_lora_cpu.yaml dpo.max_steps=10
    accelerate launch --config_file training/accelerate/single_gpu.yaml training/train_mpo.py \\
        --config training/configs/qwen2_5_vl_3b_qlora.yaml data.meta=meta/mmpr.json
"""

import argparse
import sys

from mpo_data.commands.train import add_arguments
from mpo_data.commands.train import main as train_main
from mpo_data.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        return train_main(parser.parse_args(argv))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
