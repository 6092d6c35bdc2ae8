"""Every Ray internal dragons touches, in one place, each with a way out.

Ray's public API has no way to do these six things; each is used here only,
says why, and falls back to Ray's own behaviour when a Ray upgrade moves the
name (a run then looks noisier or costs a process more; it never fails).
``tests/test_raycompat.py`` checks that the pinned Ray (2.58) still has every
one, so an upgrade that moves one fails a test, not a night.

============================  ====================================================
internal                      why
============================  ====================================================
the driver's stdstream        the workers' lines: dragons' own on the terminal,
dispatcher                    Ray's in the run's log (dragons.raycluster)
(``ray._private.worker``)
the auth mode Ray fixed at    refuse to run a cluster without token auth even
import (``ray._raylet``)      when ray was imported before dragons set it
the address file's path       forget a crashed cluster's address, which Ray's
(``ray._common.utils``)       helpers inside workers would otherwise dial
the autoscaler's status:      whether an autoscaler is there and what it is
v2's SDK (``ray.autoscaler.   launching (dragons.capacity): ``autoscaler_kind``,
v2``), v1's GCS key           ``autoscaler_report``, ``pending_launches``
(``__autoscaling_status``
via ``internal_kv``)
``_create_default_callbacks`` leave out Ray Train actors a run does not use
of Ray Train's trainer        (~0.1 GB and a process each)
============================  ====================================================
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("dragons")


def route_worker_output(route: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None] | None:
    """Send the lines Ray forwards from workers (``{"lines", "pid", "is_err", ...}``)
    to ``route`` instead of Ray's printer; returns Ray's printer (to pass lines
    on as Ray would), or None when this Ray has no such hook (Ray prints)."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        printer = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)
        dispatcher.remove_handler("ray_print_logs")
    except (ImportError, AttributeError, KeyError):
        return None
    dispatcher.add_handler("ray_print_logs", route)
    return printer


def autoscaler_events(lines: Iterable[str]) -> list[str]:
    """The autoscaler's event lines among its forwarded output (Ray shows those, not its status dumps)."""
    try:
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        return list(lines)
    return list(filter_autoscaler_events(list(lines)))


def token_auth_on() -> bool | None:
    """Whether Ray fixed token auth at import; None when this Ray cannot say."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode  # type: ignore[attr-defined]
    except ImportError:
        return None
    return bool(get_authentication_mode() == AuthenticationMode.TOKEN)


def address_file() -> str:
    """Where ``ray start`` records the running cluster's address."""
    try:
        from ray._common.utils import get_ray_address_file

        return str(get_ray_address_file(None))
    except (ImportError, TypeError):
        return os.path.join(os.environ.get("RAY_TMPDIR", "/tmp/ray"), "ray_current_cluster")


def kv_get(key: str) -> bytes | None:
    """A value from the GCS key-value store (None without one or without the key)."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        value = _internal_kv_get(key)
    except Exception:  # noqa: BLE001 (no store, another Ray: unknown)
        return None
    return value if isinstance(value, bytes) else None


# The v1 monitor writes its report under this GCS key every few seconds.
AUTOSCALING_STATUS_KEY = "__autoscaling_status"


def is_autoscaler_v2() -> bool | None:
    """Whether the cluster runs autoscaler v2 (None: unknown: an older or embedded GCS without the key)."""
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2 as check

        return bool(check(fetch_from_server=True))
    except Exception as exc:  # noqa: BLE001
        log.debug("autoscaler v2 check: %s", exc)
        return None


def autoscaler_v1_status() -> dict[str, Any] | None:
    """The v1 monitor's whole status record (``time``, ``autoscaler_report``), or None."""
    raw = kv_get(AUTOSCALING_STATUS_KEY)
    try:
        status = json.loads(raw) if raw else None
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def autoscaler_v2_pending() -> int:
    """Nodes autoscaler v2 is launching or waiting for (raises when it cannot say)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    st = get_cluster_status(ray.get_runtime_context().gcs_address)
    return int(sum(r.count for r in st.pending_launches) + len(st.pending_nodes))


def lean_trainer(trainer: type, unused: set[str]) -> type:
    """``trainer`` (Ray's TorchTrainer) without the default callbacks named in ``unused``.

    * ``PlacementGroupCleanerCallback``, on an embedded cluster: a detached
      actor that frees the workers' placement groups should the driver die. An
      embedded cluster dies with the driver, placement groups included, so
      there it only costs a process (~0.1 GB) and asks the state API (served by
      the dashboard, which an embedded run does not start) once a second.
    * ``DatasetsCallback``, when the workers decode their own rows: it starts
      Ray Train's DatasetManager actor (~0.1 GB) to hand out Ray Data shards,
      and copies the driver's DataContext to the workers; such workers use neither.

    A Ray whose trainer has no ``_create_default_callbacks``, or other callback
    names, keeps all of its callbacks.
    """
    if not unused or not hasattr(trainer, "_create_default_callbacks"):
        return trainer

    class LeanTrainer(trainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [c for c in super()._create_default_callbacks() if type(c).__name__ not in unused]

    LeanTrainer.__name__ = f"Lean{trainer.__name__}"
    return LeanTrainer
