"""Load an exported (or persisted) shardkeep version with plain torch.distributed.checkpoint, with shardkeep
made impossible to import, and compare it with what the job wrote as expected (tests/test_export.py).

    python plain_dcp_load.py STEP_DIR EXPECTED.pt
"""

from __future__ import annotations

import importlib.abc
import sys


class _NoShardkeep(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "shardkeep" or name.startswith("shardkeep."):
            raise ImportError("shardkeep must not be needed to read this checkpoint")
        return None


sys.meta_path.insert(0, _NoShardkeep())

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

from export_worker import build_model  # noqa: E402


def main() -> int:
    step_dir, expected = sys.argv[1], sys.argv[2]
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates the optimizer's state, which the load then overwrites
    for p in model.parameters():
        torch.nn.init.constant_(p.data, -3.0)
    # the way DCP's own docs load: names from get_state_dict (the optimizer's state by parameter name)
    msd, osd = get_state_dict(model, opt)
    assert all(isinstance(k, str) and "." in k for k in osd["state"]), list(osd["state"])
    extra = {"epoch": 0, "name": "", "ratios": [0.0, 0.0]}
    state = {"model": msd, "optim": osd, "extra": extra}
    dcp.load(state, storage_reader=dcp.FileSystemReader(step_dir))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    want = torch.load(expected, weights_only=True)
    bad = [k for k, v in want["model"].items() if not torch.equal(model.state_dict()[k], v)]
    for i, p in enumerate(model.parameters()):
        for k, v in want["optim"][i].items():
            if not torch.equal(opt.state[p][k], v):
                bad.append(f"optim.{i}.{k}")
    if state["extra"] != {"epoch": 2, "name": "run-a", "ratios": [0.5, 0.25]}:
        bad.append(f"extra: {state['extra']}")
    if opt.param_groups[0]["lr"] != 1e-2:
        bad.append("lr")
    assert "shardkeep" not in sys.modules
    print("MISMATCH " + ", ".join(bad) if bad else "OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
