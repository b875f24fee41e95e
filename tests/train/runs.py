"""What the training tests read from a run and how they cut one short."""
import json
import signal
import time


def train_rows(path):
    """The "train" rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in open(path) if '"train"' in line]


def sigterm_after_step(proc, metrics, step: int, timeout: float) -> str:
    """SIGTERM the trainer process ``proc`` once its ``metrics`` file logs a training row at
    ``step`` or later (or ``timeout`` s passed); its stderr, after asserting it exited 143."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(r["step"] >= step for r in train_rows(metrics)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 128 + signal.SIGTERM, err
    return err
