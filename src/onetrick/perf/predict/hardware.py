"""The hardware the cost model knows by name: GPU profiles (:data:`PROFILES`) and links
(:data:`NAMED_LINKS`), and the parsing of a ``--link``/``--link-mbps`` value (one-line
ConfigError, no argparse)."""
from __future__ import annotations

from onetrick.config import ConfigError

#: the named links, the one table of them (assumed, not measured): Gbit/s per worker per
#: direction, latency per message (us), what it is (``title``: its name in the predicted
#: GPU tables). ``onetrick plan/simulate --link NAME``, and each GPU profile's default.
NAMED_LINKS = {
    "nvlink4": {"gbps": 3600.0, "latency_us": 5.0, "title": "NVLink 4 (H100 SXM, ~450 GB/s)",
                "note": "NVLink 4, H100 SXM: ~450 GB/s per direction per GPU"},
    "pcie5": {"gbps": 512.0, "latency_us": 5.0, "title": "PCIe Gen5 x16 (~64 GB/s)",
              "note": "PCIe Gen5 x16: ~64 GB/s per direction"},
    "pcie4": {"gbps": 200.0, "latency_us": 5.0, "title": "PCIe Gen4 x16 (~25 GB/s)",
              "note": "PCIe Gen4 x16: ~25 GB/s achieved between GPUs (A100 PCIe)"},
    "pcie3": {"gbps": 48.0, "latency_us": 10.0, "title": "PCIe Gen3 x16 (~6 GB/s)",
              "note": "PCIe Gen3 x16: ~6 GB/s achieved between GPUs (GTX Titan, K20: the paper's era)"},
    "ib-400": {"gbps": 400.0, "latency_us": 10.0, "title": "400 Gbit/s network",
               "note": "400 Gbit/s InfiniBand NDR, one port per GPU"},
    "eth-100": {"gbps": 100.0, "latency_us": 10.0, "title": "100 Gbit/s network",
                "note": "100 Gbit/s Ethernet (RoCE), one port per GPU"},
}

#: links for the predicted GPU tables (scripts/h100_table.py), Gbit/s per GPU per direction
LINKS = {NAMED_LINKS[n]["title"]: NAMED_LINKS[n]["gbps"] for n in ("nvlink4", "pcie5", "ib-400", "eth-100")}

#: named hardware profiles: peak fp32 FLOP/s, default achieved efficiency, memory
#: bandwidth (for SGD updates), default link (a name of :data:`NAMED_LINKS`; ``link_gbps``
#: and ``latency_us`` are that link's, filled in below; ``measured``: this machine's
#: processes, probed by ``plan``, unlimited at 50 us per message in ``simulate``)
PROFILES = {
    "gtx-titan": {"peak_flops": 4.5e12, "efficiency": 0.4, "mem_gbs": 288.0, "link": "pcie3",
                      "note": "fp32. GTX Titan (Kepler, 2013): 4.5 TFLOP/s peak and 288 GB/s from the spec sheet; "
                              "40% of peak achieved: assumed, not measured; link PCIe 3 x16 ~6 GB/s (assumed)"},
    "k20": {"peak_flops": 3.5e12, "efficiency": 0.4, "mem_gbs": 208.0, "link": "pcie3",
                "note": "fp32. Tesla K20: 3.5 TFLOP/s peak and 208 GB/s from the spec sheet (the K20x's: 3.9 and "
                        "250); 40% of peak achieved: assumed, not measured; link PCIe 3 (assumed)"},
    "a100-pcie": {"peak_flops": 19.5e12, "efficiency": 0.5, "mem_gbs": 1555.0, "link": "pcie4",
                      "note": "fp32 without TF32. A100 PCIe: 19.5 TFLOP/s peak and 1.5 TB/s from the spec sheet; "
                              "50% of peak achieved: assumed, not measured; link PCIe 4 x16 ~25 GB/s (assumed)"},
    "h100": {"peak_flops": 67e12, "efficiency": 0.5, "mem_gbs": 3350.0, "link": "nvlink4",
             "note": "fp32 without TF32 (simulate --precision bf16: the measured bf16 times). H100 80GB SXM: 67 "
                     "TFLOP/s peak and 3.35 TB/s from the spec sheet; 50% of peak achieved: assumed (plan's FLOP "
                     "counts); the measured times, calibrated on AlexNet B=128 224px on one H100 alone (torch 2.11, "
                     "cudnn.benchmark; simulate splits them per block by FLOP): fp32 step 13.3 ms, trunk 10.9, head "
                     "1.65; bf16 10.6, 9.2, 1.7; link: NVLink 4 ~450 GB/s per direction per GPU (assumed)",
             "measured": {"batch": 128, "fp32": {"step_ms": 13.3, "trunk_ms": 10.9, "head_ms": 1.65},
                          "bf16": {"step_ms": 10.6, "trunk_ms": 9.2, "head_ms": 1.7}}},
    "this-device": {"peak_flops": None, "efficiency": None, "mem_gbs": None, "link": "measured", "link_gbps": None,
                    "latency_us": 50.0,
                    "note": "the device at hand (--device cpu|cuda), every block timed"},
    "this-cpu": {"peak_flops": None, "efficiency": None, "mem_gbs": None, "link": "measured", "link_gbps": None,
                 "latency_us": 50.0,
                     "note": "this machine, every block timed (one thread per worker by default)"},
}
for _prof in PROFILES.values():   # a GPU profile's link numbers are its named link's
    if _prof["link"] in NAMED_LINKS:
        _prof.update(link_gbps=NAMED_LINKS[_prof["link"]]["gbps"], latency_us=NAMED_LINKS[_prof["link"]]["latency_us"])
del _prof


def link_mbps(value: str, named: str) -> float:
    """``--link-mbps``: a positive number of Mbit/s (``named``: the word it also takes,
    handled by the caller). ConfigError, one line, otherwise."""
    try:
        mbps = float(value)
    except ValueError:
        raise ConfigError(f"--link-mbps expects a number or '{named}' (got {value!r})") from None
    if not mbps > 0:
        raise ConfigError(f"--link-mbps must be positive (got {value})")
    return mbps


def named_link(value: str, names, option: str = "--link") -> str | float:
    """``--link``: one of ``names`` (the named links), ``measured``, or a positive number
    of Mbit/s (returned as a float). ConfigError, one line listing the names, otherwise."""
    if value in names or value == "measured":
        return value
    try:
        mbps = float(value)
    except ValueError:
        raise ConfigError(f"unknown link {value!r} for {option}; choose one of: {', '.join(names)}, measured, "
                          f"or a number of Mbit/s") from None
    if not mbps > 0:
        raise ConfigError(f"{option} must be a link name or a positive number of Mbit/s (got {value})")
    return mbps
