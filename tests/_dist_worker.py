"""Worker for the 2-process test: `python -m torch.distributed.run --nproc_per_node 2 _dist_worker.py OUT`.

Trains the tiny model's adapter on CPU (gloo) and, on rank 0, saves the result to OUT/dist.safetensors
and the history to OUT/dist.json. Must use the same setup as test_train.dist_setup().
"""

import json
import sys
from pathlib import Path

import torch

from _train_helpers import adapter_params, made_up_examples, tiny_llama


def setup():
    from offsite.train import TrainConfig

    model = tiny_llama()
    cfg = TrainConfig(lr=3e-3, epochs=2, batch_size=8, micro_batch_size=4, eval_every=2,
                      checkpoint_every=2, warmup_steps=1, schedule="cosine", progress=False)
    return model, adapter_params(model), made_up_examples(10), made_up_examples(5, seed=7), cfg


def main(out: Path) -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from offsite.train import train

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.state
    model, trainable, tr, va, cfg = setup()
    cfg.micro_batch_size = 2  # 2 processes x 2 per micro-batch x 2 accumulation = global batch 8
    result = train(model, trainable, tr, va, cfg, out / "run", accelerator=accelerator)
    if accelerator.is_main_process:
        save_file(result.best_state, out / "dist.safetensors")
        (out / "dist.json").write_text(json.dumps({"history": result.history, "steps": result.steps,
                                                   "tokens_seen": result.tokens_seen}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
