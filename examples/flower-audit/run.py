"""Run the example's Flower app in this process (no Ray), once per defense, into one gileak run
directory; then `gileak leaderboard DIR` shows every row."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_audit_app import DEFAULTS, make_client_app, server_app  # noqa: E402

from gileak.integrations.flower import run_in_process  # noqa: E402

#: (gileak defense in the model, Flower privacy mod, extra attacks): one Flower run each. `ignore`
#: (the paper's attack on variational bottlenecks) is IG itself on a model without one.
VARIANTS = {"none": ("none", "none", ""), "cvb": ("cvb", "none", "ignore"),
            "fixedclipping": ("none", "fixedclipping", ""), "localdp": ("none", "localdp", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="flower-audit-run")
    parser.add_argument("--variants", default="none,cvb,fixedclipping,localdp", help=", ".join(VARIANTS))
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=DEFAULTS["num-rounds"])
    parser.add_argument("--audit-rounds", default=DEFAULTS["audit-rounds"])
    parser.add_argument("--audit-clients", type=int, default=DEFAULTS["audit-clients"])
    parser.add_argument("--attacks", default=DEFAULTS["attacks"])
    parser.add_argument("--iterations", type=int, default=DEFAULTS["iterations"])
    args = parser.parse_args()
    for name in args.variants.split(","):
        defense, privacy, extra = VARIANTS[name.strip()]
        attacks = ",".join(filter(None, [args.attacks, extra]))
        run_config = {**DEFAULTS, "defense": defense, "privacy": privacy, "out": args.out, "num-rounds": args.rounds,
                      "audit-rounds": args.audit_rounds, "audit-clients": args.audit_clients,
                      "attacks": attacks, "iterations": args.iterations}
        started = time.perf_counter()
        client_app = make_client_app(privacy, float(DEFAULTS["clip"]), float(DEFAULTS["epsilon"]))
        run_in_process(server_app, client_app, args.nodes, run_config)
        print(f"{name}: {time.perf_counter() - started:.0f} s")
    print(f"gileak leaderboard {args.out}")


if __name__ == "__main__":
    main()
