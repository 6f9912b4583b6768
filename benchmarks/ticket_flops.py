"""What the tickets of a benchmark cost: density, multiply-accumulates and theoretical speed-up per method
and density, counted from each run folder's saved mask (no retraining).

For every ``results.json`` under the given folders that has a ``mask.safetensors`` beside it (a CS run,
an IMP level, ...), the network is rebuilt from the folder's ``hparams.json`` and ``lottery.cost`` counts
its kept Conv and Linear weights times their output positions. Rows group the seeds of one folder, method and
density target (or IMP level); the FLOPs are means over the seeds.

    python benchmarks/ticket_flops.py benchmarks/out/imp_conv_fashion benchmarks/out/cs_density_conv4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from lottery.cost import network_cost  # noqa: E402
from lottery.experiment import build_model_without_data, nominal_shape  # noqa: E402
from lottery.hparams import DataHparams, ModelHparams  # noqa: E402
from lottery.masks import Mask  # noqa: E402


def _hparams(folder: Path) -> dict | None:
    for d in (folder, folder.parent):
        if (d / "hparams.json").is_file():
            return json.loads((d / "hparams.json").read_text())
    return None


def _network(hp: dict):
    data, model = DataHparams.from_dict(hp["data"]), ModelHparams.from_dict(hp["model"])
    return build_model_without_data(data, model), nominal_shape(data)[0]


def rows(roots: list[Path]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    cache: dict[str, tuple] = {}
    for root in roots:
        for results_path in sorted(root.rglob("results.json")):
            folder = results_path.parent
            if not (folder / "mask.safetensors").is_file():
                continue
            r = json.loads(results_path.read_text())
            hp = _hparams(folder)
            if hp is None or r.get("test_accuracy") is None:
                continue
            key = json.dumps([hp["data"], hp["model"]], sort_keys=True)
            if key not in cache:
                cache[key] = _network(hp)
            net, shape = cache[key]
            cost = network_cost(net, Mask.load(folder / "mask.safetensors"), shape)
            method = r.get("method", "?")
            if r.get("kind") == "search-imp-c":
                method = "imp-c"
            if method in ("imp", "imp-c") and r.get("rewind"):
                method += f" k={r['rewind']}"  # IMP (k = 0), IMP-R and IMP-C in one folder stay apart
            point = r.get("target_density") or (f"level {r['level']}" if r.get("level") is not None else "")
            if not point and method == "cs":  # a CS search steered by s0 and its rounds, not by a density
                point = f"s0 = {r.get('s0'):g}, {r.get('rounds')} round(s)"
            groups[(hp["model"]["model"], root.name, method, str(point))].append(
                {"density": r["density"], "flops": cost["flops_sparse"], "dense": cost["flops_dense"],
                 "acc": r["test_accuracy"], "seed": r.get("seed")})
    out = []
    for (model, root, method, point), rs in groups.items():
        out.append({"model": model, "root": root, "method": method, "point": point, "n": len(rs),
                    "density": statistics.mean(x["density"] for x in rs),
                    "flops": statistics.mean(x["flops"] for x in rs), "dense": rs[0]["dense"],
                    "acc": statistics.mean(x["acc"] for x in rs),
                    "acc_sd": statistics.stdev([x["acc"] for x in rs]) if len(rs) > 1 else None})
    return sorted(out, key=lambda r: (r["model"], r["root"], r["method"], -r["density"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+", type=Path)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print("| model | runs in | method | setting | seeds | density | FLOPs/example (mean) | of dense | speed-up (FLOPs) | test acc % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows(args.roots):
        sd = f" ± {100 * r['acc_sd']:.2f}" if r["acc_sd"] is not None else ""
        print(f"| {r['model']} | {r['root']} | {r['method']} | {r['point']} | {r['n']} | {r['density']:.4f} | {r['flops']:,.0f} | "
              f"{100 * r['flops'] / r['dense']:.1f} % | {r['dense'] / r['flops']:.2f}x | {100 * r['acc']:.2f}{sd} |")


if __name__ == "__main__":
    main()
