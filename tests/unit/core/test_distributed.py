"""Beyond one process and one device: torchrun data parallel (two gloo ranks on the CPU"""

from memlens.core import distributed


def test_outside_torchrun_the_helpers_are_the_identity():
    assert not distributed.init() and distributed.world_size() == 1 and distributed.is_main()
    items = list(range(11))
    assert distributed.shard(items, 4) == items == distributed.mine(11, 4)
    assert distributed.gather(items, 11, 4) == items
    assert distributed.total(3) == 3
