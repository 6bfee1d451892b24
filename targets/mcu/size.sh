#!/usr/bin/env bash
# Builds the example firmware and prints the bytes each section takes: what a Cortex-M4F
# flashes (.vector_table, .text, .rodata, .data) and what it reserves in RAM (.bss, .data).
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --locked
readelf -S --wide target/thumbv7em-none-eabihf/release/tern-mcu-example |
  while read -r line; do
    [[ $line == \[* ]] || continue
    # shellcheck disable=SC2086 # split the fields on purpose
    set -- ${line#*]} x x x x x
    case "$1" in
      .vector_table|.text|.rodata|.data|.bss) printf '%-14s %6d bytes\n' "$1" "$((16#$5))" ;;
    esac
  done
