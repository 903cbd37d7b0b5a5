#!/usr/bin/env python3
"""Reward process for the tests: one JSON line per completion in, one number out.
Rewards completions that mention the row's `word` column (1.0), else 0.0; null when the
row has no `word`."""
import json
import sys

for line in sys.stdin:
    item = json.loads(line)
    word = item["columns"].get("word")
    if word is None:
        print("null", flush=True)
    else:
        print(1.0 if word in item["completion"] else 0.0, flush=True)
