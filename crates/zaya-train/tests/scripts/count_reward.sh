#!/bin/sh
# Reward process in shell: the number of bytes of each request line, divided by 1000.
while IFS= read -r line; do
  n=$(printf '%s' "$line" | wc -c)
  echo "$n / 1000" | awk '{ printf "%.3f\n", $1 / 1000 }'
done
