#!/usr/bin/env python3
"""Tool environment for the tests: answers every tool call with a JSON result naming the
function and echoing its arguments."""
import json
import sys

for line in sys.stdin:
    req = json.loads(line)
    results = [json.dumps({"function": c["name"], "echo": c["arguments"]}) for c in req["tool_calls"]]
    print(json.dumps({"tool_results": results}), flush=True)
