"""Runs `gptcpp bench` (see python/gptcpp/bench.py): python benchmarks/bench.py --shape gpt2 --peers"""
import sys

from gptcpp.bench import main

if __name__ == "__main__":
    sys.exit(main())
