"""The fast attention path keeps no L x L buffer: peak memory grows linearly with L."""

import subprocess
import sys

SCRIPT = """
import resource, torch, bigmodel
from bigmodel.ops.attention import attention
L = 8192
q, k, v = (torch.randn(1, 2, L, 32, requires_grad=True) for _ in range(3))
lengths = torch.tensor([L - 100])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for causal in (False, True):
    out, _ = attention(q, k, v, None, lengths if not causal else None, causal)
    out.sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) // 1024)
"""


def test_peak_memory_at_8192_keys_is_linear():
    # Two heads of 8192 x 8192 float32 scores would be 512 MiB; q/k/v, their grads and the output are
    # ~12 MiB. A fresh process, so that ru_maxrss measures this call alone.
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    grown_mib = int(res.stdout.strip().splitlines()[-1])
    assert grown_mib < 96, f"peak memory grew by {grown_mib} MiB at L=8192: an L x L buffer?"
