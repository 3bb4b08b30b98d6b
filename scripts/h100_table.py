"""Print docs/BENCHMARKS.md's predicted H100 table: DDP and the hybrid at 8 and 64 GPUs
over the assumed links of ``onetrick.perf.predict.hardware.LINKS``, from the ``h100`` profile's
measured one-GPU times (fp32 and bf16 compute). Run: PYTHONPATH=src python3 scripts/h100_table.py"""
from onetrick.perf.predict.blocks import model_blocks
from onetrick.perf.predict.compute import ScaledCosts
from onetrick.perf.predict.hardware import LINKS, PROFILES
from onetrick.perf.predict.step import STRATEGY_VARIANTS, Link, sweep

LABELS = ("data/ddp", "hybrid/a", "hybrid/b")
LATENCY_US = {"NVLink": 5.0, "PCIe": 5.0}   # per message; networks: 10 us (assumed)


def main() -> None:
    prof = PROFILES["h100"]
    blocks = model_blocks("alexnet", 1000, 224)
    variants = [v for v in STRATEGY_VARIANTS if v.label in LABELS + ("single",)]
    print("| link (assumed) | compute | " + " | ".join(f"{lab} K={k}" for k in (8, 64) for lab in LABELS) + " |")
    print("|---|---|" + "---:|" * (2 * len(LABELS)))
    for name, gbps in LINKS.items():
        lat = next((v for k, v in LATENCY_US.items() if name.startswith(k)), 10.0)
        for precision in ("fp32", "bf16"):
            costs = ScaledCosts(blocks, prof["measured"][precision], 128, prof["mem_gbs"])
            rows = sweep(blocks, costs, [1, 8, 64], 128, variants, Link(gbps, lat, 0.0))
            by = {(r["label"], r["workers"]): r["speedup"] for r in rows}
            cells = [f"{by[(lab, k)]:.2f}x" for k in (8, 64) for lab in LABELS]
            print(f"| {name} | {precision} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
