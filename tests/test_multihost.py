"""Two local processes x 4 CPU devices train like one process x 8 devices; a dead process
makes the other fail within a bounded time instead of hanging."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

from tests.configs import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = textwrap.dedent("""
  import os, signal, sys
  import jax
  jax.config.update("jax_num_cpu_devices", 4)
  sys.path.insert(0, {root!r})
  from tests.configs import tiny_config
  from mmjax.train import loop
  def maybe_die(step, metrics):
    if step == {die_at} and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGKILL)
  cfg = tiny_config({data_dir!r}, num_devices=-1, total_steps=6, **{{"checkpoint.every": 3}})
  cfg.distributed.heartbeat_timeout = 10
  cfg.distributed.initialization_timeout = 60
  loop.train(cfg, {workdir!r}, callbacks=[maybe_die])
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(data_dir, workdir, die_at=-1):
  script = _WORKER.format(root=ROOT, data_dir=data_dir, workdir=workdir, die_at=die_at)
  port = _free_port()
  procs = []
  for i in range(2):
    env = {**os.environ, "MMJAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "MMJAX_NUM_PROCESSES": "2", "MMJAX_PROCESS_ID": str(i)}
    env.pop("XLA_FLAGS", None)
    procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_two_processes_match_one_process_eight_devices(data_dir, tmp_path):
  from mmjax.train import loop
  loop.train(tiny_config(data_dir, num_devices=8, total_steps=6, **{"checkpoint.every": 3}),
             str(tmp_path / "one"))
  procs = _launch(data_dir, str(tmp_path / "two"))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
  np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"),
                             rtol=2e-4, atol=2e-5)
  with open(tmp_path / "two" / "results.json") as f:
    assert json.load(f)["devices"] == 8


def test_dead_process_makes_the_other_exit(data_dir, tmp_path):
  procs = _launch(data_dir, str(tmp_path / "dies"), die_at=2)
  t0 = time.time()
  procs[1].wait(timeout=600)
  assert procs[1].returncode == -9
  died = time.time()
  out = procs[0].communicate(timeout=240)[0]
  assert procs[0].returncode != 0, out[-3000:]
  assert time.time() - died < 180, f"survivor took {time.time() - died:.0f}s after the death"
  assert time.time() - t0 < 600
