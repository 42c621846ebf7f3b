"""The registry core with a real SQLite store, no network."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from logpose.errors import ConflictError, NotFoundError
from logpose.health import HealthDefaults
from logpose.model import Health, parse_instance_spec
from logpose.registry import ChangeKind, Registry
from logpose.store import SqlStore, database_url_for


def spec(address: str = "10.0.0.5:8080", protocol: str = "Http", **fields):
    return parse_instance_spec({"address": address, "protocol": protocol, **fields})


async def open_registry(data_dir: Path) -> tuple[Registry, SqlStore]:
    store = SqlStore(database_url_for(data_dir, None))
    await store.open()
    registry = Registry(store)
    await registry.load()
    return registry, store


def test_write_bumps_index_and_notifies(tmp_path):
    async def scenario():
        registry, store = await open_registry(tmp_path)
        changes = []
        registry.subscribe(changes.append)
        instance, created = await registry.register("web", spec())
        assert created
        assert registry.index == 1
        assert [change.kind for change in changes] == [ChangeKind.SERVICE_UPSERT, ChangeKind.INSTANCE_UPSERT]
        assert changes[-1].instance_id == instance.id
        await store.close()

    asyncio.run(scenario())


def test_rise_and_fall_thresholds():
    registry = Registry(None, defaults=HealthDefaults(rise=2, fall=2))

    async def scenario():
        instance, _ = await registry.register("web", spec())
        registry.record_check_result(instance.id, True, "ok")
        assert registry.get_instance(instance.id).health is Health.UNKNOWN
        registry.record_check_result(instance.id, True, "ok")
        assert registry.get_instance(instance.id).health is Health.HEALTHY
        registry.record_check_result(instance.id, False, "refused")
        assert registry.get_instance(instance.id).health is Health.HEALTHY
        registry.record_check_result(instance.id, True, "ok")
        registry.record_check_result(instance.id, False, "refused")
        assert registry.get_instance(instance.id).health is Health.HEALTHY, "a success resets the failure count"
        registry.record_check_result(instance.id, False, "refused")
        assert registry.get_instance(instance.id).health is Health.UNHEALTHY
        assert registry.discoverable("web") == []

    asyncio.run(scenario())


def test_output_change_alone_does_not_notify():
    registry = Registry(None)

    async def scenario():
        instance, _ = await registry.register("web", spec())
        registry.record_check_result(instance.id, True, "took 1 ms")
        index = registry.index
        changes = []
        registry.subscribe(changes.append)
        registry.record_check_result(instance.id, True, "took 2 ms")
        assert registry.index == index
        assert changes == []
        assert registry.get_instance(instance.id).output == "took 2 ms"

    asyncio.run(scenario())


def test_reregistration_keeps_health_unless_check_changes():
    registry = Registry(None)

    async def scenario():
        instance, _ = await registry.register("web", spec())
        registry.record_check_result(instance.id, True, "ok")
        same, created = await registry.register("web", spec(tags=["new"]))
        assert not created
        assert same.id == instance.id
        assert same.health is Health.HEALTHY
        changed, _ = await registry.register("web", spec(check={"type": "none"}))
        assert changed.health is Health.UNKNOWN

    asyncio.run(scenario())


def test_service_conflicts_and_missing():
    registry = Registry(None)

    async def scenario():
        await registry.create_service("web")
        with pytest.raises(ConflictError):
            await registry.create_service("web")
        await registry.register("web", spec())
        with pytest.raises(ConflictError):
            await registry.delete_service("web")
        with pytest.raises(NotFoundError):
            await registry.delete_service("nothing")
        with pytest.raises(NotFoundError):
            await registry.deregister("4b0e1c3e-8a55-4a8e-9d6f-0e7a2b1c9d00")

    asyncio.run(scenario())


def test_catalog_and_health_reload_from_store(tmp_path):
    async def scenario():
        registry, store = await open_registry(tmp_path)
        instance, _ = await registry.register("web", spec(tags=["a"], metadata={"zone": "z1"}, weight=7))
        registry.record_check_result(instance.id, True, "ok")
        await registry.flush_health()
        index = registry.index
        await store.close()

        reloaded, store = await open_registry(tmp_path)
        assert reloaded.index == index
        loaded = reloaded.get_instance(instance.id)
        assert loaded.health is Health.HEALTHY
        assert loaded.tags == ("a",)
        assert loaded.metadata == {"zone": "z1"}
        assert loaded.weight == 7
        assert loaded.address == instance.address
        await store.close()

    asyncio.run(scenario())


def test_index_never_goes_back_after_delete(tmp_path):
    async def scenario():
        registry, store = await open_registry(tmp_path)
        instance, _ = await registry.register("web", spec())
        await registry.deregister(instance.id)
        index = registry.index
        await store.close()
        reloaded, store = await open_registry(tmp_path)
        assert reloaded.index == index
        await store.close()

    asyncio.run(scenario())


def test_reregistration_keeps_fields_not_sent():
    registry = Registry(None)

    async def scenario():
        first, _ = await registry.register(
            "web", spec(tags=["blue"], metadata={"zone": "a"}, weight=7, check={"type": "none"})
        )
        again, created = await registry.register("web", spec())
        assert not created
        assert again.check == first.check
        assert again.tags == ("blue",)
        assert again.metadata == {"zone": "a"}
        assert again.weight == 7

    asyncio.run(scenario())


def test_concurrent_deletes_of_one_instance_and_service(tmp_path):
    async def scenario():
        registry, store = await open_registry(tmp_path)
        instance, _ = await registry.register("web", spec(check={"type": "none"}))
        results = await asyncio.gather(
            registry.deregister(instance.id), registry.deregister(instance.id), return_exceptions=True
        )
        assert all(not isinstance(result, Exception) or isinstance(result, NotFoundError) for result in results)
        assert registry.get_instance(instance.id) is None
        await registry.create_service("api")
        results = await asyncio.gather(
            registry.delete_service("api"), registry.delete_service("api"), return_exceptions=True
        )
        assert all(not isinstance(result, Exception) or isinstance(result, NotFoundError) for result in results)
        assert registry.get_service("api") is None
        await store.close()

    asyncio.run(scenario())


def test_concurrent_same_key_registrations_end_as_one(tmp_path):
    async def scenario():
        registry, store = await open_registry(tmp_path)
        results = await asyncio.gather(*(registry.register("web", spec(check={"type": "none"})) for _ in range(8)))
        assert len({instance.id for instance, _created in results}) == 1
        assert sum(created for _instance, created in results) == 1
        assert len(registry.instances_of("web")) == 1
        await store.close()
        reloaded, store = await open_registry(tmp_path)
        assert len(reloaded.instances_of("web")) == 1
        await store.close()

    asyncio.run(scenario())
