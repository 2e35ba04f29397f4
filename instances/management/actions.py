"""spawn / stop / restart: change desired state, then (by default) wait for the outcome."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError

from instances import operations as ops
from instances.management.base import OperatorCommand, key_arg
from instances.models import Instance

State = Instance.State


class InstanceActionCommand(OperatorCommand):
    verb = ""
    target_states: tuple[str, ...] = ()

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("key", type=key_arg, metavar="SERVICE:ID", help="e.g. notes:alice")
        parser.add_argument(
            "--no-wait", action="store_true", help="Record the request and return at once."
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=60.0,
            help="Seconds to wait for the instance to settle (default 60).",
        )

    def act(self, options: dict[str, Any]) -> Instance:
        raise NotImplementedError

    def handle(self, *args: Any, **options: Any) -> None:
        instance = self.act(options)
        key = options["key"]
        if options["no_wait"]:
            self.stdout.write(f"{key}: {self.verb} requested")
            return
        if not ops.supervisor_alive():
            self.stdout.write(
                f"{key}: {self.verb} recorded, but no supervisor is running; it takes effect "
                "when `manage.py runsupervisor` starts."
            )
            return
        self.stdout.write(f"{key}: {self.verb} requested; waiting (up to {options['timeout']:g}s)")
        self.wait(instance, options["timeout"])

    def wait(self, instance: Instance, timeout: float) -> None:
        # Let the supervisor see the request before judging the state we read back.
        ops.wait_for_states(instance.pk, {State.STARTING, State.STOPPING}, min(timeout, 1.5))
        final = ops.wait_for_states(instance.pk, (*self.target_states, State.FAILED), timeout)
        detail = f" (pid {final.pid})" if final.pid else ""
        if final.state == State.FAILED and State.FAILED not in self.target_states:
            raise CommandError(f"{final.key}: failed: {final.last_error}")
        if final.state not in self.target_states:
            raise CommandError(f"{final.key}: still {final.state} after {timeout:g}s")
        self.stdout.write(f"{final.key}: {final.state}{detail}")


class SpawnCommand(InstanceActionCommand):
    help = (
        "Start SERVICE:ID, registering the tenant first if needed. Also clears a `failed` "
        "instance. Waits until it is running (or fails) unless --no-wait."
    )
    verb = "start"
    target_states = (State.RUNNING,)

    def act(self, options: dict[str, Any]) -> Instance:
        instance, created = ops.register(options["key"], start=True)
        if created:
            self.stdout.write(f"registered {instance.key}")
        return ops.request_start(instance.key)


class StopCommand(InstanceActionCommand):
    help = "Stop SERVICE:ID (SIGTERM, then SIGKILL after stop_timeout). A request wakes it again."
    verb = "stop"
    target_states = (State.STOPPED,)

    def act(self, options: dict[str, Any]) -> Instance:
        return ops.request_stop(options["key"])


class RestartCommand(InstanceActionCommand):
    help = "Restart SERVICE:ID (stop, then start). Waits until it is running again."
    verb = "restart"
    target_states = (State.RUNNING,)

    def act(self, options: dict[str, Any]) -> Instance:
        return ops.request_restart(options["key"])
