import pytest

import edgeloop


def test_public_names_are_exactly_these() -> None:
    assert sorted(edgeloop.__all__) == sorted(
        name for name in dir(edgeloop)
        if not name.startswith("_") or name == "__version__"
        if name not in {"annotations"} and not _is_submodule(name))


def _is_submodule(name: str) -> bool:
    import types

    return isinstance(getattr(edgeloop, name), types.ModuleType)


def test_every_public_name_is_documented() -> None:
    for name in edgeloop.__all__:
        obj = getattr(edgeloop, name)
        if callable(obj):
            assert obj.__doc__, name


def test_device_public_names_are_exactly_these() -> None:
    import edgeloop.device as device

    assert sorted(device.__all__) == sorted(n for n in dir(device) if not n.startswith("_"))
    for name in device.__all__:
        obj = getattr(device, name)
        assert not callable(obj) or obj.__doc__, name


def test_federated_public_names_are_exactly_these() -> None:
    pytest.importorskip("flwr")
    import edgeloop.federated as federated

    assert sorted(federated.__all__) == sorted(
        n for n in dir(federated) if not n.startswith("_"))
    import edgeloop.federated.simulation  # noqa: F401  (a submodule must not shadow a name)

    for name in federated.__all__:
        obj = getattr(federated, name)
        assert not _is_module(obj) and (not callable(obj) or obj.__doc__), name


def _is_module(obj: object) -> bool:
    import types

    return isinstance(obj, types.ModuleType)
