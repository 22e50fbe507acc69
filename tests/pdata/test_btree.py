import struct

import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockera.pdata.btree import BTree, ValueType
from blockera.pdata.btree_node import Node
from blockera.pdata.checksum import BTREE_NODE
from blockera.pdata.walkers import walk_btree
from tests.pdata.helpers import commit, fresh_tm, node_refs, space_map_refs


def _leaf_sizes(tree: BTree, root: int) -> list[int]:
    sizes, stack = [], [root]
    while stack:
        node = Node(tree.tm.read(stack.pop(), BTREE_NODE))
        if node.is_leaf:
            sizes.append(node.nr_entries)
        else:
            stack.extend(node.child(i) for i in reversed(range(node.nr_entries)))
    return sizes


def test_appending_keys_gives_the_kernels_leaf_shapes() -> None:
    # docs/persistent-data.md §4verified on kernel images: 516 -> [248, 126, 142], 258 -> [126, 132]
    for n, expected in ((516, [248, 126, 142]), (258, [126, 132]), (252, [252])):
        tm, _ = fresh_tm()
        tree = BTree(tm, ValueType(8))
        root = tree.empty()
        for k in range(n):
            root, _ = tree.insert(root, k, struct.pack("<Q", k))
        assert _leaf_sizes(tree, root) == expected


def test_insert_lookup_remove_across_levels() -> None:
    tm, _ = fresh_tm()
    tree = BTree(tm, ValueType(12))
    root = tree.empty()
    rng = np.random.default_rng(3)
    keys = rng.permutation(5000).tolist()
    for k in keys:
        root, inserted = tree.insert(root, k, struct.pack("<IQ", k, k * 3))
        assert inserted
    commit(tm)
    assert [k for k, _ in tree.walk(root)] == sorted(keys)
    assert tree.lookup(root, 4321) == struct.pack("<IQ", 4321, 4321 * 3)
    assert tree.lookup(root, 5000) is None
    for k in keys[:4990]:
        root = tree.remove(root, k)
    commit(tm)
    assert [k for k, _ in tree.walk(root)] == sorted(keys[4990:])
    assert tree.find_lowest_key(root) == min(keys[4990:])


def test_two_level_tree() -> None:
    tm, _ = fresh_tm()
    tree = BTree(tm, ValueType(8), levels=2)
    root = tree.empty()
    for dev in range(3):
        for block in range(400):
            root, _ = tree.insert(root, [dev, block], struct.pack("<Q", dev * 1000 + block))
    assert tree.lookup(root, [2, 399]) == struct.pack("<Q", 2399)
    assert tree.lookup(root, [3, 0]) is None
    root = tree.remove(root, [1, 7])
    assert tree.lookup(root, [1, 7]) is None
    assert tree.lookup(root, [1, 8]) == struct.pack("<Q", 1008)


class BtreeMachine(RuleBasedStateMachine):
    """Any sequence of inserts, overwrites, removes, commits and snapshots keeps the tree equal
    to a dict, structurally valid, and every reference count exact."""

    def __init__(self) -> None:
        super().__init__()
        self.tm, self.sm = fresh_tm(8192)
        self.tree = BTree(self.tm, ValueType(8))
        self.root = self.tree.empty()
        self.model: dict[int, int] = {}
        self.snapshots: list[tuple[int, dict[int, int]]] = []

    keys = st.integers(0, 3000)

    @rule(key=keys, value=st.integers(0, 2**63))
    def insert(self, key: int, value: int) -> None:
        self.root, inserted = self.tree.insert(self.root, key, struct.pack("<Q", value))
        assert inserted == (key not in self.model)
        self.model[key] = value

    @rule(start=keys, count=st.integers(1, 600))
    def insert_run(self, start: int, count: int) -> None:
        for key in range(start, start + count):
            self.root, _ = self.tree.insert(self.root, key, struct.pack("<Q", key))
            self.model[key] = key

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.root = self.tree.remove(self.root, key)
        del self.model[key]

    @precondition(lambda self: len(self.model) > 50)
    @rule(data=st.data())
    def remove_many(self, data: st.DataObject) -> None:
        keys = sorted(self.model)
        start = data.draw(st.integers(0, len(keys) - 1))
        for key in keys[start: start + 300]:
            self.root = self.tree.remove(self.root, key)
            del self.model[key]

    @rule()
    def commit(self) -> None:
        commit(self.tm)

    @precondition(lambda self: len(self.snapshots) < 2)
    @rule()
    def snapshot(self) -> None:
        """Share the whole tree with a frozen copy, as a metadata snapshot does."""
        self.tm.inc(self.root)
        self.snapshots.append((self.root, dict(self.model)))

    @precondition(lambda self: self.snapshots)
    @rule()
    def drop_snapshot(self) -> None:
        root, _ = self.snapshots.pop(0)
        self.tree.delete(root)

    @invariant()
    def matches_model_and_counts_are_exact(self) -> None:
        assert dict((k, struct.unpack("<Q", v)[0]) for k, v in self.tree.walk(self.root)) == self.model
        for root, model in self.snapshots:
            assert dict((k, struct.unpack("<Q", v)[0]) for k, v in self.tree.walk(root)) == model
        refs = np.zeros(self.sm.nr_blocks, dtype=np.int64)
        visited: set[int] = set()
        space_map_refs(self.sm, refs)
        node_refs(self.tm, self.root, refs, visited)
        for root, _ in self.snapshots:
            node_refs(self.tm, root, refs, visited)
        assert np.array_equal(refs, self.sm.counts.astype(np.int64))

    @invariant()
    def structure_is_valid(self) -> None:
        commit(self.tm)
        leaves = walk_btree(self.tm.bm, self.root, 8, "tree")
        assert leaves.keys.tolist() == sorted(self.model)
        for loc in leaves.nodes[1:]:
            node = Node(self.tm.read(loc, BTREE_NODE))
            assert node.nr_entries >= node.max_entries // 3, "non-root node under a third full"


BtreeMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30,
                                          deadline=None)
TestBtreeMachine = BtreeMachine.TestCase
