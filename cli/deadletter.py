"""`offdpo deadletter list|replay`: inspect the dead-letter topic and republish chosen letters.

list     counts of dead letters by service and error type; `--show N`: the newest N letters
replay   republish chosen letters (filters: --service, --error-type, --origin-topic, --since,
         --limit; --dry-run shows what would be sent) to their original topic with the original
         key and value (acks=all), after the cause is fixed

Replaying is safe to repeat: pair ids and shard keys are content hashes and Kafka positions
downstream, so a letter replayed twice is labelled/scored again but trains nothing twice. The replay
itself may publish duplicates of a record (and the dead letter stays on its topic; it is not consumed).

Letters carried by reference (the original record was too big to carry whole: original_truncated)
are refused: their value here is only the first KiB. Read the whole record back from the origin
topic/partition/offset the letter names (while it is within the topic's retention), e.g.
`kcat -C -b BROKER -t TOPIC -p PARTITION -o OFFSET -c 1`, fix it, and produce it again yourself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from offdpo.v1 import records_pb2

log = logging.getLogger(__name__)

REASON_CHARS = 100


@dataclass
class Letter:
    """One record of the dead-letter topic: where it sits there, and the decoded DeadLetter."""

    dl_partition: int
    dl_offset: int
    letter: records_pb2.DeadLetter

    @property
    def failed_at(self) -> dt.datetime:
        return self.letter.failed_at.ToDatetime(tzinfo=dt.UTC)

    @property
    def origin(self) -> str:
        return f"{self.letter.topic}[{self.letter.partition}]@{self.letter.offset}"


def decode(records: Iterable[Any]) -> tuple[list[Letter], int]:
    """ConsumerRecords of the dead-letter topic -> (letters oldest first, number undecodable)."""
    letters, bad = [], 0
    for rec in records:
        msg = records_pb2.DeadLetter()
        try:
            msg.ParseFromString(rec.value or b"")
        except Exception:  # noqa: BLE001 - a record that is not a DeadLetter: counted, skipped
            bad += 1
            continue
        if not msg.topic:
            bad += 1
            continue
        letters.append(Letter(rec.partition, rec.offset, msg))
    letters.sort(key=lambda lt: (lt.letter.failed_at.seconds, lt.letter.failed_at.nanos, lt.dl_partition, lt.dl_offset))
    return letters, bad


def counts(letters: Sequence[Letter]) -> Counter[tuple[str, str]]:
    return Counter((lt.letter.service, lt.letter.error_type) for lt in letters)


def parse_since(text: str) -> dt.datetime:
    """ISO 8601 time; without a zone it is UTC."""
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def select(
    letters: Sequence[Letter],
    *,
    service: str | None = None,
    error_type: str | None = None,
    origin_topic: str | None = None,
    since: dt.datetime | None = None,
    limit: int | None = None,
) -> list[Letter]:
    """The letters matching every given filter, oldest first; `limit` keeps the oldest that many."""
    chosen = [
        lt
        for lt in letters
        if (service is None or lt.letter.service == service)
        and (error_type is None or lt.letter.error_type == error_type)
        and (origin_topic is None or lt.letter.topic == origin_topic)
        and (since is None or lt.failed_at >= since)
    ]
    return chosen[:limit] if limit is not None else chosen


def _short(text: str, n: int = REASON_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def describe(lt: Letter) -> str:
    ref = " (by reference)" if lt.letter.original_truncated else ""
    return (
        f"{lt.failed_at.isoformat(timespec='seconds')} {lt.letter.service or '?'} {lt.origin}{ref} "
        f"{lt.letter.error_type or '?'}: {_short(lt.letter.reason)}"
    )


def format_list(letters: Sequence[Letter], undecodable: int, topic: str, show: int = 0) -> str:
    lines = [
        f"{len(letters)} dead letters on {topic}"
        + (f" ({undecodable} undecodable records skipped)" if undecodable else "")
    ]
    if letters:
        lines.append(f"{'count':>7}  {'service':<12} error_type")
        for (service, error_type), n in sorted(counts(letters).items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"{n:>7}  {service or '?':<12} {error_type or '?'}")
    if show > 0 and letters:
        lines.append(f"newest {min(show, len(letters))}:")
        lines.extend("  " + describe(lt) for lt in reversed(letters[-show:]))
    return "\n".join(lines)


def fetch_hint(lt: Letter) -> str:
    m = lt.letter
    return (
        f"refused {lt.origin}: carried by reference ({m.original_size} bytes, sha256 {m.original_sha256}); "
        f"read it back from topic {m.topic} partition {m.partition} offset {m.offset} "
        f"(e.g. kcat -C -b BROKER -t {m.topic} -p {m.partition} -o {m.offset} -c 1), fix it and produce it yourself"
    )


@dataclass
class ReplayResult:
    sent: list[Letter]
    refused: list[Letter]


def replay(
    letters: Sequence[Letter],
    producer: Any,
    *,
    dry_run: bool = False,
    out: TextIO = sys.stdout,
    ack_timeout_s: float = 60.0,
) -> ReplayResult:
    """Republish each letter's original key and value to its original topic, waiting for every ack.

    Letters carried by reference are refused with how to fetch them. Raises on the first send the
    broker does not acknowledge (what was printed before it was sent)."""
    result = ReplayResult([], [])
    for lt in letters:
        m = lt.letter
        if m.original_truncated:
            print(fetch_hint(lt), file=out)
            result.refused.append(lt)
            continue
        if dry_run:
            print(f"would replay {lt.origin} ({m.error_type}) -> {m.topic}", file=out)
        else:
            meta = producer.send(m.topic, key=m.original_key or None, value=m.original_value).get(timeout=ack_timeout_s)
            where = f"{m.topic}[{meta.partition}]@{meta.offset}" if hasattr(meta, "offset") else m.topic
            print(f"replayed {lt.origin} ({m.error_type}) -> {where}", file=out)
        result.sent.append(lt)
    verb = "would replay" if dry_run else "replayed"
    print(
        f"{verb} {len(result.sent)}, refused {len(result.refused)} (carried by reference). "
        "Replaying again trains nothing twice (pair ids are content hashes downstream).",
        file=out,
    )
    return result


def _read_letters(kafka_cfg: Any, topic: str) -> tuple[list[Letter], int]:
    from offdpo.kafka import read_topic

    return decode(read_topic(kafka_cfg, topic))


def run(
    args: argparse.Namespace,
    *,
    kafka_cfg: Any = None,
    read: Callable[[Any, str], Iterable[Any]] | None = None,
    make_producer: Callable[[Any], Any] | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """The command; `read(cfg, topic)` and `make_producer(cfg)` are injectable for tests."""
    if kafka_cfg is None:
        from offdpo.config import KafkaConfig

        kafka_cfg = KafkaConfig.from_env()
    topic = args.topic or kafka_cfg.deadletter_topic
    if read is None:
        from offdpo.kafka import read_topic

        read = read_topic
    letters, bad = decode(read(kafka_cfg, topic))
    if args.action == "list":
        print(format_list(letters, bad, topic, args.show), file=out)
        return 0
    since = parse_since(args.since) if args.since else None
    chosen = select(
        letters,
        service=args.service,
        error_type=args.error_type,
        origin_topic=args.origin_topic,
        since=since,
        limit=args.limit,
    )
    print(f"{len(chosen)} of {len(letters)} dead letters on {topic} match", file=out)
    producer = None
    if chosen and not args.dry_run:
        if make_producer is None:
            from offdpo.kafka import make_producer as _mk

            producer = _mk(kafka_cfg, "offdpo-deadletter-replay")
        else:
            producer = make_producer(kafka_cfg)
    try:
        result = replay(chosen, producer, dry_run=args.dry_run, out=out)
    finally:
        if producer is not None:
            producer.flush()
            producer.close()
    return 1 if result.refused else 0


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "replay"])
    p.add_argument("--topic", help="the dead-letter topic (default: OFFDPO_TOPIC_DEADLETTER, offdpo.deadletter.v1)")
    p.add_argument("--show", type=int, default=0, metavar="N", help="list: also show the newest N letters")
    p.add_argument("--service", help="replay: only letters from this service")
    p.add_argument("--error-type", help="replay: only letters of this error_type")
    p.add_argument("--origin-topic", help="replay: only letters whose original record came from this topic")
    p.add_argument("--since", help="replay: only letters that failed at or after this ISO time (UTC if no zone)")
    p.add_argument("--limit", type=int, help="replay: at most this many (oldest first)")
    p.add_argument("--dry-run", action="store_true", help="replay: print what would be republished, send nothing")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "deadletter",
        help="list dead letters by service and error type; replay chosen ones to their original topic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)
    p.set_defaults(fn=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="offdpo deadletter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _configure(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
