"""Training steps of a recipe for a fixed time, with or without the thread governor (diffusion.threads): run two
copies at once to see what a busy machine does to the pace, and what tuning the threads gives back.

    python benchmarks/busy_machine.py --config configs/mnist_cpu.yaml --seconds 60 &
    python benchmarks/busy_machine.py --config configs/mnist_cpu.yaml --seconds 60 [--no_tuning]

Prints one JSON line: steps, images/s, the thread changes. The step is the recipe's (network, objective, batch,
precision; AdamW), without Lightning, data loading or evaluation.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import yaml

from diffusion import threads
from diffusion.runs import cpu_has_native_bf16


def build(config: dict):
    import importlib

    def make(entry):
        module, _, name = entry["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**entry.get("init_args", {}))

    model = config["model"]["init_args"]
    data = config["data"]["init_args"]
    net_cfg = dict(model["net"])
    net_cfg["init_args"] = {**net_cfg.get("init_args", {}), "in_channels": data.get("channels", 1),
                            "image_size": data.get("image_size", 28)}
    return make(net_cfg), make(model["objective"]), int(data.get("batch_size", 128)), model.get("optim", {}).get("lr", 1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_cpu.yaml")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--no_tuning", action="store_true", help="keep torch's thread count")
    args = parser.parse_args()
    config = yaml.safe_load(open(args.config))
    net, objective, batch, lr = build(config)
    bf16 = str(config.get("trainer", {}).get("precision", "")).startswith("bf16") and cpu_has_native_bf16()
    opt = torch.optim.AdamW(net.parameters(), lr)
    x = torch.rand(batch, net.in_channels, net.image_size, net.image_size) * 2 - 1
    gov = None if args.no_tuning else threads.ThreadGovernor()
    start_threads = torch.get_num_threads()
    steps, start = 0, time.monotonic()
    while time.monotonic() - start < args.seconds:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = objective.loss(net, x, None)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        if gov is not None:
            gov.tick("training step")
    wall = time.monotonic() - start
    print(json.dumps({"config": args.config, "tuning": gov is not None, "threads_at_start": start_threads,
                      "threads_at_end": torch.get_num_threads(), "bf16": bf16, "steps": steps,
                      "seconds": round(wall, 1), "images_per_s": round(steps * batch / wall, 1),
                      "changes": [m for _, _, m in (gov.changes if gov else [])]}))


if __name__ == "__main__":
    main()
