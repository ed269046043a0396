"""The trainer CLI with a pipeline: same losses as one device, checkpoints across pipelines.

Usage (by tests/multidevice/test_multidevice.py): python pipeline_cli.py WORKDIR
(a) one device, 4 steps (a copy of its step-2 checkpoint kept); (b) 8 devices, mesh pipeline=2
x expert=2 x data=2 with DualPipe, 2 steps: the losses of (a); (c) (b)'s step-2 checkpoint
resumed without a pipeline (data=2 x expert=2 x tensor=2) to step 4; (d) (a)'s step-2 checkpoint
resumed with the DualPipe pipeline to step 4: both log (a)'s losses of steps 3-4; (e) the
DualPipe run of (b) as 2 processes x 4 devices (gloo): (a)'s losses. All within 1e-5 relative. Four micro-batches of 4 rows per step everywhere (DualPipe on 2 ranks needs 4).
(f) the issue's command as the main job has it (8 rows per step: DualPipe's 4 micro-batches of
2 rows do not split over data x expert = 4, so each gets 2 empty rows) against (g), one device
with the whole step as one batch: the same losses. (h) (a)'s step-2 checkpoint resumed with
DualPipeV on pipeline=2 x tensor=2 x data=2 to step 4: (a)'s losses of steps 3-4.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import devices as devices_lib   # tests/multidevice/devices.py, beside this script

ROOT = devices_lib.ROOT
SHAPE = ["--config.model.num_hidden_layers=3", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.model.moe_intermediate_size=32",
         "--config.model.q_lora_rank=32", "--config.model.kv_lora_rank=32",
         "--config.data.seq_len=32", "--config.data.global_batch=16",
         "--config.data.micro_batch=4", "--config.data.eval_batches=1",
         "--config.train.log_every=1", "--config.train.eval_every=1000",
         "--config.train.checkpoint_every=2", "--config.train.sample_tokens=2",
         "--config.optim.warmup_steps=1"]
PIPE = {"pipeline": 2, "expert": 2, "data": 2}
PIPE_TENSOR = {"pipeline": 2, "tensor": 2, "data": 2}


def command(workdir, steps, mesh, extra=()):
    mesh_flags = [f"--config.mesh.{k}={v}" for k, v in mesh.items()]
    return [sys.executable, "-m", "dsv3_jax.train", "--config", "experiments/configs/tiny.py",
            f"--workdir={workdir}", *SHAPE, f"--config.train.steps={steps}", *mesh_flags, *extra]


def env(devices):
    return devices_lib.env(devices, JAX_PLATFORMS="cpu")


def run(workdir, steps, mesh, devices, extra=()):
    out = subprocess.run(command(workdir, steps, mesh, extra), env=env(devices), cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    if out.returncode:
        print(out.stdout[-3000:], out.stderr[-6000:])
        sys.exit(f"a run failed with exit code {out.returncode}")


def run_two_processes(workdir, steps, mesh, extra=()):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(command(workdir, steps, mesh, [
        *extra, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]),
        env=env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=1200)
        if p.returncode:
            print(out[-3000:], err[-6000:])
            sys.exit(f"a 2-process run failed with exit code {p.returncode}")


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def close(a, b):
    return all(abs(a[k] - b[k]) <= 1e-5 * abs(b[k]) for k in b)


def main(work):
    one = {"data": 1}
    run(f"{work}/a", 2, one, 1)
    shutil.copytree(f"{work}/a", f"{work}/a2")
    shutil.copytree(f"{work}/a", f"{work}/a3")
    run(f"{work}/a", 4, one, 1)
    run(f"{work}/b", 2, PIPE, 8, ["--config.pipeline.schedule=dualpipe"])
    run(f"{work}/b", 4, {"data": 2, "expert": 2, "tensor": 2}, 8)
    run(f"{work}/a2", 4, PIPE, 8, ["--config.pipeline.schedule=dualpipe"])
    run(f"{work}/a3", 4, PIPE_TENSOR, 8, ["--config.pipeline.schedule=dualpipev"])
    run_two_processes(f"{work}/e", 2, PIPE, ["--config.pipeline.schedule=dualpipe"])
    main_job = ["--config.data.global_batch=8", "--config.data.micro_batch=0"]
    run(f"{work}/f", 2, PIPE, 8, [*main_job, "--config.pipeline.schedule=dualpipe"])
    run(f"{work}/g", 2, one, 1, main_job)
    a, b, d = losses(f"{work}/a"), losses(f"{work}/b"), losses(f"{work}/a2")
    h = losses(f"{work}/a3")
    e, f, g = losses(f"{work}/e"), losses(f"{work}/f"), losses(f"{work}/g")
    checks = {"pipeline_equals_one_device": close({k: b[k] for k in (1, 2)},
                                                  {k: a[k] for k in (1, 2)}),
              "pipeline_ckpt_resumes_without": close({k: b[k] for k in (3, 4)},
                                                     {k: a[k] for k in (3, 4)}),
              "ckpt_resumes_with_pipeline": close({k: d[k] for k in (3, 4)},
                                                  {k: a[k] for k in (3, 4)}),
              "ckpt_resumes_with_pipeline_and_tensor": close({k: h[k] for k in (3, 4)},
                                                             {k: a[k] for k in (3, 4)}),
              "two_processes": close(e, {k: a[k] for k in (1, 2)}),
              "padded_micro_batches": close(f, g)}
    print(json.dumps({"one_device": a, "pipeline_then_none": b, "none_then_pipeline": d,
                      "none_then_pipeline_and_tensor": h,
                      "two_processes_losses": e, "padded": f, "padded_reference": g,
                      **checks}))
    print("OK" if all(checks.values()) else "FAILED")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main(sys.argv[1])
