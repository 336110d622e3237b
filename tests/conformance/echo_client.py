"""Echo client for Autobahn's fuzzingserver: ``python tests/conformance/echo_client.py URL AGENT``.

URL is the fuzzingserver's base (``ws://127.0.0.1:9001``). The client asks ``/getCaseCount``,
runs ``/runCase?case=N&agent=AGENT`` for every case, echoing each message, then asks
``/updateReports?agent=AGENT`` so the reports are written. Whether a case passed is the
fuzzingserver's judgement (its index.json), not this script's.
"""

import asyncio
import sys
import time
from urllib.parse import quote

import tether

MAX_MESSAGE_SIZE = 16 * 2**20
CASE_TIMEOUT = 60.0  # seconds; the slowest case (9.* large messages) takes a few
PROGRESS_EVERY = 25


async def echo(url: str) -> None:
    async with tether.connect(url, max_message_size=MAX_MESSAGE_SIZE) as conn:
        async for message in conn:
            await conn.send(message)


async def case_count(base: str) -> int:
    async with tether.connect(f"{base}/getCaseCount", max_message_size=MAX_MESSAGE_SIZE) as conn:
        async for message in conn:
            return int(message)
    raise SystemExit("fuzzingserver closed /getCaseCount without sending the count")


async def run_case(base: str, agent: str, case: int) -> str | None:
    """Run one case; return why it ended abnormally, or None."""
    try:
        async with asyncio.timeout(CASE_TIMEOUT):
            await echo(f"{base}/runCase?case={case}&agent={agent}")
    except TimeoutError:
        return f"no close after {CASE_TIMEOUT:.0f} s"
    except Exception as exc:  # many cases must end in a failed connection: the report judges
        return f"{type(exc).__name__}: {exc}"
    return None


async def update_reports(base: str, agent: str) -> None:
    """Ask the fuzzingserver to write its reports; it answers by closing the connection."""
    try:
        await echo(f"{base}/updateReports?agent={agent}")
    except tether.ConnectionClosed as exc:  # it closes with no status code (1005)
        print(f"echo_client: updateReports: {exc}", flush=True)


async def main(base: str, agent: str) -> None:
    agent = quote(agent, safe="")
    count = await case_count(base)
    start = time.monotonic()
    print(f"echo_client: {count} cases", flush=True)
    for case in range(1, count + 1):
        error = await run_case(base, agent, case)
        if error is not None:
            print(f"  case #{case}: {error}", flush=True)
        if case % PROGRESS_EVERY == 0 or case == count:
            print(f"echo_client: {case}/{count} cases, {time.monotonic() - start:.1f} s", flush=True)
    await update_reports(base, agent)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1].rstrip("/"), sys.argv[2]))
