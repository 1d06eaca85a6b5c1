"""Step time and training memory of hfx tuners vs PEFT LoRA — now ``hfx bench speed`` (hfx/bench/speed.py).

python benchmarks/bench_adapters.py --rounds 3          # same as: hfx bench speed --rounds 3
"""

from hfx.bench.speed import main

if __name__ == "__main__":
    main()
