"""Measure `aisopod-session import-openclaw` on a large OpenClaw folder:
`python -m benchmarks.openclaw_import [--sessions N] [--lines M] [--bulky BYTES]`.

Builds an OpenClaw state folder of N sessions (default 10 000) holding M transcript
lines in all (default 10⁶: user turns, assistant turns with a tool call, tool results),
and a `sessions.json` whose entries carry `skillsSnapshot` and `systemPromptReport`
fields of BYTES each (default 2 500: a 50 MB file at 10 000 sessions); then imports it
into a new SQLite store in a fresh process, twice (the second run finds everything
imported), and prints each run's time and peak memory (the child's maximum resident set)
and the store's size. Figures go to docs/openclaw.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = 1_771_000_000_000


def build(root: Path, sessions: int, lines: int, bulky: int) -> int:
    """The folder; its size in bytes."""
    folder = root / "agents" / "main" / "sessions"
    folder.mkdir(parents=True)
    per = max(2, lines // sessions)
    size = 0
    with (folder / "sessions.json").open("w") as store:
        store.write("{\n")
        for number in range(sessions):
            session_id = f"s{number:06d}"
            entry = {
                "sessionId": session_id,
                "updatedAt": T0 + number,
                "sessionFile": f"/home/x/.openclaw/agents/main/sessions/{session_id}.jsonl",
                "label": f"chat {number}",
                "inputTokens": 1000,
                "outputTokens": 500,
                "totalTokens": 1500,
                "skillsSnapshot": {"prompt": "s" * bulky},
                "systemPromptReport": {"text": "r" * bulky},
            }
            comma = "," if number < sessions - 1 else ""
            key = json.dumps(f"agent:main:telegram:direct:{number}")
            store.write(f"{key}: {json.dumps(entry)}{comma}\n")
            with (folder / f"{session_id}.jsonl").open("w") as transcript:
                header = {
                    "type": "session",
                    "version": 3,
                    "id": session_id,
                    "timestamp": "2026-02-13T16:26:40.000Z",
                    "cwd": "/srv",
                }
                transcript.write(json.dumps(header) + "\n")
                parent = None
                for line in range(per - 1):
                    ident = f"{line:08x}"
                    at = T0 + number * 1000 + line
                    kind = line % 3
                    if kind == 0:
                        message = {
                            "role": "user",
                            "content": f"question {line} about the weather in Oslo",
                            "timestamp": at,
                        }
                    elif kind == 1:
                        message = {
                            "role": "assistant",
                            "content": [
                                {"type": "text", "text": "Let me look that up."},
                                {
                                    "type": "toolCall",
                                    "id": f"c{line}",
                                    "name": "weather",
                                    "arguments": {"city": "Oslo"},
                                },
                            ],
                            "provider": "anthropic",
                            "model": "claude-x",
                            "stopReason": "toolUse",
                            "usage": {"input": 100, "output": 20, "totalTokens": 120},
                            "timestamp": at,
                        }
                    else:
                        message = {
                            "role": "toolResult",
                            "toolCallId": f"c{line - 1}",
                            "toolName": "weather",
                            "content": [{"type": "text", "text": "rain, 4 °C"}],
                            "isError": False,
                            "timestamp": at,
                        }
                    record = {
                        "type": "message",
                        "id": ident,
                        "parentId": parent,
                        "timestamp": "2026-02-13T16:26:41.000Z",
                        "message": message,
                    }
                    transcript.write(json.dumps(record) + "\n")
                    parent = ident
        store.write("}\n")
    for path in root.rglob("*"):
        if path.is_file():
            size += path.stat().st_size
    return size


CHILD = """
import json, resource, sys, time
from aisopod_session import SessionRepository, open_database
from aisopod_session.openclaw import import_openclaw
engine = open_database(sys.argv[2])
start = time.perf_counter()
result = import_openclaw(sys.argv[1], SessionRepository(engine))
took = time.perf_counter() - start
engine.dispose()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": took, "max_rss_mib": rss, "created": result.sessions_created,
                  "messages": result.messages_imported, "existing": result.messages_existing,
                  "problems": len(result.problems)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--bulky", type=int, default=2_500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp) / "openclaw"
        started = time.perf_counter()
        size = build(root, args.sessions, args.lines, args.bulky)
        store_json = root / "agents/main/sessions/sessions.json"
        print(
            f"built {args.sessions:,} sessions, {args.lines:,} lines: {size / 2**20:.0f} MiB "
            f"(sessions.json {store_json.stat().st_size / 2**20:.0f} MiB) in "
            f"{time.perf_counter() - started:.0f} s"
        )
        db = Path(temp) / "store.db"
        for run in ("first", "again"):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(root), str(db)],
                capture_output=True,
                text=True,
                check=True,
            )
            figures = json.loads(done.stdout)
            print(
                f"{run}: {figures['seconds']:.1f} s, peak RSS {figures['max_rss_mib']:.0f} MiB, "
                f"sessions created {figures['created']:,}, messages imported "
                f"{figures['messages']:,}, already there {figures['existing']:,}, "
                f"problems {figures['problems']}"
            )
        print(f"store: {db.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
