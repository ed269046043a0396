"""Two processes x four CPU devices (gloo, coordinator on 127.0.0.1) vs one process x eight.

Usage (by tests/multidevice/test_multidevice.py): python multiprocess.py WORKDIR
Runs the trainer CLI: (a) 2 processes, mesh data=2 x expert=4, 4 steps, checkpoint at 4;
(b) 1 process with 8 devices, same mesh, 4 steps; (c) 1 process, 8 devices, a different mesh
(fsdp=2 x expert=2 x data=2), resuming (a)'s checkpoint to step 6; (d) 1 process continuing (b)'s
run to step 6. Losses of (a) == (b) and (c) == (d), within 1e-5 relative.
"""
import json
import os
import socket
import subprocess
import sys

import devices as devices_lib   # tests/multidevice/devices.py, beside this script

ROOT = devices_lib.ROOT
SHAPE = ["--config.model.num_hidden_layers=2", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.model.moe_intermediate_size=32",
         "--config.model.q_lora_rank=32", "--config.model.kv_lora_rank=32",
         "--config.data.seq_len=32", "--config.data.global_batch=8",
         "--config.data.eval_batches=1", "--config.train.log_every=1",
         "--config.train.eval_every=1000", "--config.train.checkpoint_every=4",
         "--config.train.sample_tokens=2", "--config.optim.warmup_steps=1"]


def cmd(workdir, steps, mesh, extra=()):
    mesh_flags = [f"--config.mesh.{k}={v}" for k, v in mesh.items()]
    return [sys.executable, "-m", "dsv3_jax.train", "--config",
            "experiments/configs/tiny.py:quick", f"--workdir={workdir}", *SHAPE,
            f"--config.train.steps={steps}", *mesh_flags, *extra]


def env(devices):
    return devices_lib.env(devices, JAX_PLATFORMS="cpu")


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def check(proc):
    out, err = proc.communicate(timeout=900) if isinstance(proc, subprocess.Popen) else (
        proc.stdout, proc.stderr)
    if proc.returncode != 0:
        print(out[-3000:], err[-6000:])
        sys.exit(f"a run failed with exit code {proc.returncode}")


def main(work):
    mesh_a = {"data": 2, "expert": 4, "fsdp": 1}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = [subprocess.Popen(cmd(f"{work}/two", 4, mesh_a, [f"--coordinator=127.0.0.1:{port}",
                                                          "--num_processes=2", f"--process_id={i}"]),
                            env=env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
    for p in two:
        check(p)
    run = lambda *a, **k: subprocess.run(*a, env=env(8), cwd=ROOT, capture_output=True, text=True,
                                         timeout=900, **k)
    check(run(cmd(f"{work}/one", 4, mesh_a)))
    a, b = losses(f"{work}/two"), losses(f"{work}/one")
    close = lambda x, y: all(abs(x[k] - y[k]) <= 1e-5 * abs(y[k]) for k in y) and x.keys() == y.keys()
    print("two processes:", a, "\none process:  ", b)
    assert close(a, b), "2x4 processes and 1x8 differ"
    mesh_c = {"data": 2, "expert": 2, "fsdp": 2}
    check(run(cmd(f"{work}/two", 6, mesh_c)))           # restore the 2-process checkpoint, new mesh
    check(run(cmd(f"{work}/one", 6, mesh_a)))
    c, d = losses(f"{work}/two"), losses(f"{work}/one")
    print("resumed on another mesh:", c, "\ncontinued:              ", d)
    assert close(c, d), "restore under another mesh differs"
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
