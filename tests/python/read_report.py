"""Reads a Tern device's retained report with paho-mqtt, written from core/proto/SPEC.md alone.

usage: read_report.py HOST PORT FLEET DEVICE   -> prints the report as JSON, exits 0
"""
import json
import sys
import threading

import paho.mqtt.client as mqtt

STATES = ["idle", "downloading", "verifying", "installing", "validating", "active", "failed",
          "rolled_back"]
STATE_FIELDS = [[], ["version", "received", "total"], ["version"], ["version"], ["version"],
                ["version"], ["version", "code"], ["from", "to"]]
CODES = ["BadSignature", "UnknownKey", "HashMismatch", "Downgrade", "DiskFull", "LoadFailed",
         "SelfTestFailed", "CanaryTripped"]


class Reader:
    def __init__(self, data):
        self.data, self.at = data, 0

    def byte(self):
        b = self.data[self.at]
        self.at += 1
        return b

    def varint(self):  # LEB128, as postcard encodes unsigned integers
        shift = value = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    def string(self):
        n = self.varint()
        s = self.data[self.at:self.at + n].decode("utf-8")
        self.at += n
        return s

    def option(self, read):
        return read() if self.byte() == 1 else None


def decode_report(payload):
    r = Reader(payload)
    version, tag = r.byte(), r.byte()
    if version != 1 or tag != 4:
        raise ValueError(f"not a v1 DeviceReport frame: version {version}, tag {tag}")
    report = {"device": r.string(), "generation": r.varint(), "models": []}
    for _ in range(r.varint()):
        name = r.string()
        active = r.option(r.varint)
        variant = r.varint()
        state = {"state": STATES[variant]}
        for field in STATE_FIELDS[variant]:
            value = r.varint()
            state[field] = CODES[value] if field == "code" else value
        report["models"].append({"name": name, "active_version": active, **state})
    if r.at != len(payload):
        raise ValueError("trailing bytes")
    return report


def main():
    host, port, fleet, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    topic = f"tern/v1/{fleet}/devices/{device}/reported"
    done = threading.Event()
    result = {}

    def on_connect(client, userdata, flags, reason_code, properties=None):
        client.subscribe(topic, qos=1)

    def on_message(client, userdata, msg):
        if msg.topic == topic and msg.payload:
            result["report"] = decode_report(msg.payload)
            result["retained"] = bool(msg.retain)
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    ok = done.wait(10)
    client.loop_stop()
    if not ok:
        print(f"no report on {topic}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({**result["report"], "retained": result["retained"]}))


if __name__ == "__main__":
    main()
