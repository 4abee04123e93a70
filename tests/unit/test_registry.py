import pytest

from vlhub import registry
from vlhub.registry import Registry


def test_duplicate_names_are_refused():
    table = Registry("widget")
    table.register("a")(object)
    with pytest.raises(KeyError, match="'a' is already registered"):
        table.register("a")(int)


def test_a_miss_lists_close_and_known_names():
    table = Registry("widget")
    for name in ("cosine", "constant", "linear"):
        table.register(name)(object)
    with pytest.raises(KeyError) as error:
        table.get("cosin")
    message = str(error.value)
    assert "Did you mean 'cosine'" in message
    assert "Known: constant, cosine, linear" in message


def test_components_are_enrolled_and_listable():
    import vlhub.data  # noqa: F401
    import vlhub.eval  # noqa: F401
    import vlhub.models  # noqa: F401
    import vlhub.objectives  # noqa: F401

    assert {"clip"} <= set(registry.list_objectives())
    assert {"synthetic", "csv", "imagefolder"} <= set(registry.list_datasets())
    assert {"synthetic", "imagefolder"} <= set(registry.list_eval_tasks())
    assert "open_clip" in registry.list_models()
    assert registry.SCHEDULES.names() == ["constant", "cosine"]
