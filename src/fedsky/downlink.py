"""The downlink: what the coordinator sends each site so it holds the new global model.

A site that answered the previous round holds that round's model (as it reconstructed it), so
it gets the *delta* to the current global model, through the downlink pipeline; any other site
(missed rounds, a lost reply, a restarted coordinator) gets the whole model in fp32. In a run's
first round every site holds the initial model already (`build_model` gives the same weights
for the same config and seed everywhere), so round 0 sends a delta from it too, with a
fingerprint of the initial model that the site checks before applying it.

The coordinator mirrors each site's reconstruction (`Encoded.decoded`, the same float
operations the site performs), so the next delta is taken against exactly what the site holds:
whatever a lossy downlink dropped is sent later, which is error feedback without a residual.
A lossless downlink (no stage but zstd) always sends the whole model: the fp32 delta would be
as large, and the site would hold held + delta, not the global model bit for bit (a resumed
run could then not reproduce an uninterrupted one).

Sites that hold the same model share one encoding and one mirror, so the work and memory grow
with the number of distinct models held (usually one), not with the number of sites.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from fedsky.codecs import Params, Pipeline, RoundSeeds
from fedsky.wire import pack

INITIAL = -1  # the round whose model every site holds before round 0: the initial one


def fingerprint(params: Params) -> str:
    """sha256 over the names and fp32 bytes of the tensors, in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def apply_delta(held: Params, delta: Params) -> Params:
    """The model a site holds after a downlink delta; the coordinator's mirror uses this too,
    so both sides round identically."""
    return {k: held[k] + delta[k] for k in held}


class Downlink:
    """Which model each site holds, and the task payloads that bring it to the global one."""

    def __init__(self, codec: Pipeline, initial: Params | None = None) -> None:
        """`initial`: the model every site built for itself (only when starting at round 0)."""
        self.codec = codec
        self._held: dict[str, tuple[int, Params]] = {}  # site -> (round, model it holds)
        self._pending: dict[str, tuple[int, Params]] = {}  # this round's, until confirmed
        self._initial = (INITIAL, initial) if initial is not None else (None, None)
        self._initial_sha = fingerprint(initial) if initial is not None else None

    def tasks(self, round_idx: int, sites: list[str], global_params: Params,
              seeds: RoundSeeds) -> dict[str, bytes]:
        """One task payload per site: a delta from round `round_idx - 1`, or the full model."""
        payloads: dict[int | None, tuple[bytes, Params]] = {}  # id(held model) -> payload
        tasks = {}
        for site in sites:
            round_held, held = self._held.get(site, self._initial)
            if round_held != round_idx - 1 or not self.codec.lossy:
                held = None
            key = None if held is None else id(held)
            if key not in payloads:
                payloads[key] = self._payload(round_idx, held, global_params, seeds)
            tasks[site], model = payloads[key]
            self._pending[site] = (round_idx, model)
        return tasks

    def _payload(self, round_idx: int, held: Params | None, global_params: Params,
                 seeds: RoundSeeds) -> tuple[bytes, Params]:
        if held is None:
            header = {"round": round_idx, "base": None}
            return pack(global_params, header, self.codec.zstd_level), global_params
        enc = self.codec.encode({k: global_params[k] - held[k] for k in held}, seeds)
        header = {"round": round_idx, "base": round_idx - 1, "codec": enc.header}
        if round_idx - 1 == INITIAL:
            header["base_sha256"] = self._initial_sha
        return pack(enc.tensors, header, enc.zstd_level), apply_delta(held, enc.decoded)

    def confirm(self, replied: Iterable[str]) -> None:
        """A reply proves the site applied its task; without one, what it holds is unknown
        (the task may or may not have arrived), so it gets the full model next time."""
        replied = set(replied)
        for site in list(self._pending):
            self.settle(site, site in replied)

    def settle(self, site: str, replied: bool) -> None:
        """One site's task is over (the async loop settles sites one at a time)."""
        held = self._pending.pop(site)
        if replied:
            self._held[site] = held
        else:
            self._held.pop(site, None)
