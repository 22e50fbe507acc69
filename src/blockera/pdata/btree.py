"""Persistent-data btree operations (docs/persistent-data.md §4; the kernel's dm-btree*.c):
lookup, insert, remove, walk and delete over nodes laid out as `btree_node` describes. Lookups
use "greatest key <= search key"; all leaves sit at the same depth.

Updates follow the kernel's algorithms exactly (shadowing along a two-node spine, split beneath
the root, rebalance into a sibling with >= 8 free slots, one-into-two or two-into-three splits,
rebalancing and merging on removal), so a blockera-driven device allocates the same number of
metadata blocks as the kernel would and its status lines agree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterator

from blockera.errors import MetadataError
from blockera.pdata.btree_node import (INTERNAL_NODE, LEAF_NODE, MAX_DEPTH, SPACE_THRESHOLD, Node,
                                       calc_max_entries, copy_entries, init_node, shift_down,
                                       shift_up)
from blockera.pdata.checksum import BTREE_NODE
from blockera.pdata.transaction import TransactionManager

_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class ValueType:
    """What a leaf value is. `inc`/`dec` take (packed values, count) and adjust the reference
    counts of blocks the values point at; `equal` compares two packed values."""

    size: int
    inc: Callable[[bytes, int], None] | None = None
    dec: Callable[[bytes, int], None] | None = None
    equal: Callable[[bytes, bytes], bool] | None = None


class _Spine:
    """The kernel's shadow spine: at most a node and its parent are held; the root's new
    location is remembered from the first step."""

    def __init__(self, tree: "BTree") -> None:
        self.tree = tree
        self.nodes: list[tuple[int, Node]] = []
        self.root = 0

    def step(self, location: int, vt: ValueType) -> None:
        if len(self.nodes) == 2:
            self.nodes.pop(0)
        new_location, buf, inc = self.tree.tm.shadow(location, BTREE_NODE)
        node = Node(buf)
        if inc:
            self.tree.inc_children(node, vt)
        if not self.nodes:
            self.root = new_location
        self.nodes.append((new_location, node))

    @property
    def current(self) -> tuple[int, Node]:
        return self.nodes[-1]

    @property
    def parent(self) -> tuple[int, Node]:
        return self.nodes[0]

    @property
    def has_parent(self) -> bool:
        return len(self.nodes) > 1

    def set_current(self, location: int, node: Node) -> None:
        self.nodes[-1] = (location, node)


class BTree:
    """One btree type (its value type and number of levels) over a transaction manager."""

    def __init__(self, tm: TransactionManager, value_type: ValueType, levels: int = 1) -> None:
        self.tm = tm
        self.value_type = value_type
        self.levels = levels
        self.le64_type = ValueType(8, self._le64_inc, self._le64_dec,
                                   lambda a, b: a == b)

    # -- value-type helpers ------------------------------------------------------------------
    def _le64_inc(self, values: bytes, count: int) -> None:
        for (b,) in struct.iter_unpack("<Q", values[: 8 * count]):
            self.tm.inc(b)

    def _le64_dec(self, values: bytes, count: int) -> None:
        for (b,) in struct.iter_unpack("<Q", values[: 8 * count]):
            self.tm.dec(b)

    def inc_children(self, node: Node, vt: ValueType) -> None:
        n = node.nr_entries
        if node.is_internal:
            for i in range(n):
                self.tm.inc(node.child(i))
        elif vt.inc is not None and n:
            vt.inc(node.values(0, n), n)

    def _read(self, location: int) -> Node:
        return Node(self.tm.read(location, BTREE_NODE))

    # -- creation ----------------------------------------------------------------------------
    def empty(self) -> int:
        """A new, empty tree (one leaf); returns its root."""
        location, buf = self.tm.new_block(BTREE_NODE)
        init_node(buf, LEAF_NODE, calc_max_entries(self.value_type.size), self.value_type.size)
        return location

    # -- lookup ------------------------------------------------------------------------------
    def _lookup_raw(self, root: int, key: int) -> tuple[int, bytes] | None:
        location = root
        for _ in range(MAX_DEPTH):
            node = self._read(location)
            i = node.lower_bound(key)
            if i < 0 or i >= node.nr_entries:
                return None
            if node.is_leaf:
                return node.key(i), node.value(i)
            location = node.child(i)
        raise MetadataError("btree deeper than 64 levels (cycle?)", block=root)

    def lookup(self, root: int, keys: list[int] | int) -> bytes | None:
        """The value stored under `keys` (one key per level), or None."""
        keys = [keys] if isinstance(keys, int) else keys
        value = b""
        for level, key in enumerate(keys):
            found = self._lookup_raw(root, key)
            if found is None or found[0] != key:
                return None
            value = found[1]
            if level < self.levels - 1:
                root = _U64.unpack(value)[0]
        return value

    def find_lowest_key(self, root: int) -> int | None:
        location = root
        for _ in range(MAX_DEPTH):
            node = self._read(location)
            if node.nr_entries == 0:
                return None
            if node.is_leaf:
                return node.key(0)
            location = node.child(0)
        raise MetadataError("btree deeper than 64 levels (cycle?)", block=root)

    def walk(self, root: int) -> Iterator[tuple[int, bytes]]:
        """Every (key, value) of a single-level tree in key order."""
        stack = [root]
        while stack:
            node = self._read(stack.pop())
            n = node.nr_entries
            if node.is_leaf:
                for i in range(n):
                    yield node.key(i), node.value(i)
            else:
                stack.extend(node.child(i) for i in range(n - 1, -1, -1))

    # -- insertion ---------------------------------------------------------------------------
    def insert(self, root: int, keys: list[int] | int, value: bytes) -> tuple[int, bool]:
        """Insert or overwrite; returns (new root, True if a new entry was added)."""
        keys = [keys] if isinstance(keys, int) else keys
        spine = _Spine(self)
        block = root
        index = -1
        last = self.levels - 1
        for level in range(last):
            index = self._insert_raw(spine, block, self.le64_type, keys[level], index)
            _, node = spine.current
            if index >= node.nr_entries or node.key(index) != keys[level]:
                new_tree = self.empty()
                node.insert_at(index, keys[level], _U64.pack(new_tree))
            block = node.child(index)
        index = self._insert_raw(spine, block, self.value_type, keys[last], index)
        _, node = spine.current
        vt = self.value_type
        if index >= node.nr_entries or node.key(index) != keys[last]:
            node.insert_at(index, keys[last], value)
            inserted = True
        else:
            old = node.value(index)
            if vt.dec is not None and (vt.equal is None or not vt.equal(old, value)):
                vt.dec(old, 1)
            node.set_value(index, value)
            inserted = False
        return spine.root, inserted

    def _insert_raw(self, spine: _Spine, root: int, vt: ValueType, key: int, index: int) -> int:
        i = index
        top = True
        while True:
            spine.step(root, vt)
            location, node = spine.current
            if spine.has_parent and i >= 0:
                spine.parent[1].set_child(i, location)
            if not self._has_space_for_insert(node, key):
                if top:
                    self._split_beneath(spine)
                else:
                    self._rebalance_or_split(spine, vt, i, key)
                location, node = spine.current
            i = node.lower_bound(key)
            if node.is_leaf:
                break
            if i < 0:
                node.set_key(0, key)
                i = 0
            root = node.child(i)
            top = False
        if i < 0 or node.key(i) != key:
            i += 1
        return i

    @staticmethod
    def _has_space_for_insert(node: Node, key: int) -> bool:
        if node.nr_entries == node.max_entries:
            if node.is_leaf:
                i = node.lower_bound(key)
                return i >= 0 and node.key(i) == key
            return False
        return True

    def _new_sibling(self, like: Node) -> tuple[int, Node]:
        location, buf = self.tm.new_block(BTREE_NODE)
        node = init_node(buf, like.flags, like.max_entries, like.value_size)
        return location, node

    def _split_beneath(self, spine: _Spine) -> None:
        """Full root: move its entries into two new children; the root becomes internal."""
        _, parent = spine.current
        n = parent.nr_entries
        nr_left = n // 2
        left_loc, left = self._new_sibling(parent)
        copy_entries(left, 0, parent, 0, nr_left)
        left.nr_entries = nr_left
        right_loc, right = self._new_sibling(parent)
        copy_entries(right, 0, parent, nr_left, n - nr_left)
        right.nr_entries = n - nr_left
        struct.pack_into("<I", parent.buf, 4, INTERNAL_NODE)
        struct.pack_into("<III", parent.buf, 16, 2, calc_max_entries(8), 8)
        new_parent = Node(parent.buf)
        new_parent.set_key(0, left.key(0))
        new_parent.set_child(0, left_loc)
        new_parent.set_key(1, right.key(0))
        new_parent.set_child(1, right_loc)
        location, _ = spine.current
        spine.set_current(location, new_parent)

    @staticmethod
    def _redistribute2(left: Node, right: Node) -> None:
        nr_left, nr_right = left.nr_entries, right.nr_entries
        total = nr_left + nr_right
        target_left = total // 2
        target_right = total - target_left
        if nr_left < target_left:
            delta = target_left - nr_left
            copy_entries(left, nr_left, right, 0, delta)
            shift_down(right, delta)
        elif nr_left > target_left:
            delta = nr_left - target_left
            if nr_right:
                shift_up(right, delta)
            copy_entries(right, 0, left, target_left, delta)
        left.nr_entries = target_left
        right.nr_entries = target_right

    @staticmethod
    def _redistribute3(left: Node, center: Node, right: Node) -> None:
        nr_left, nr_right = left.nr_entries, right.nr_entries
        total = nr_left + nr_right
        target_left = total // 3
        target_center = (total - target_left) // 2
        target_right = total - target_left - target_center
        if nr_left < target_left:
            left_short = target_left - nr_left
            copy_entries(left, nr_left, right, 0, left_short)
            copy_entries(center, 0, right, left_short, target_center)
            shift_down(right, nr_right - target_right)
        elif nr_left < target_left + target_center:
            left_to_center = nr_left - target_left
            copy_entries(center, 0, left, target_left, left_to_center)
            copy_entries(center, left_to_center, right, 0, target_center - left_to_center)
            shift_down(right, nr_right - target_right)
        else:
            right_short = target_right - nr_right
            shift_up(right, right_short)
            copy_entries(right, 0, left, nr_left - right_short, right_short)
            copy_entries(center, 0, left, target_left, nr_left - target_left)
        left.nr_entries = target_left
        center.nr_entries = target_center
        right.nr_entries = target_right

    def _shadow_child(self, parent: Node, index: int, vt: ValueType) -> tuple[int, Node]:
        location, buf, inc = self.tm.shadow(parent.child(index), BTREE_NODE)
        node = Node(buf)
        if inc:
            self.inc_children(node, vt)
        parent.set_child(index, location)
        return location, node

    def _split_one_into_two(self, spine: _Spine, parent_index: int, key: int) -> None:
        left_loc, left = spine.current
        right_loc, right = self._new_sibling(left)
        self._redistribute2(left, right)
        _, parent = spine.parent
        parent.insert_at(parent_index + 1, right.key(0), _U64.pack(right_loc))
        if key >= right.key(0):
            spine.set_current(right_loc, right)

    def _split_two_into_three(self, spine: _Spine, parent_index: int, vt: ValueType,
                              key: int) -> None:
        _, parent = spine.parent
        if parent_index == 0:
            middle_index = 1
            left_loc, left = spine.current
            right_loc, right = self._shadow_child(parent, parent_index + 1, vt)
        else:
            middle_index = parent_index
            right_loc, right = spine.current
            left_loc, left = self._shadow_child(parent, parent_index - 1, vt)
        middle_loc, middle = self._new_sibling(left)
        self._redistribute3(left, middle, right)
        parent.set_key(middle_index, right.key(0))
        parent.insert_at(middle_index, middle.key(0), _U64.pack(middle_loc))
        if key < middle.key(0):
            spine.set_current(left_loc, left)
        elif key < right.key(0):
            spine.set_current(middle_loc, middle)
        else:
            spine.set_current(right_loc, right)

    def _rebalance_left(self, spine: _Spine, vt: ValueType, parent_index: int, key: int) -> None:
        _, parent = spine.parent
        sib_loc, left = self._shadow_child(parent, parent_index - 1, vt)
        _, right = spine.current
        self._redistribute2(left, right)
        parent.set_key(parent_index, right.key(0))
        if key < right.key(0):
            spine.set_current(sib_loc, left)

    def _rebalance_right(self, spine: _Spine, vt: ValueType, parent_index: int,
                         key: int) -> None:
        _, parent = spine.parent
        sib_loc, right = self._shadow_child(parent, parent_index + 1, vt)
        _, left = spine.current
        self._redistribute2(left, right)
        parent.set_key(parent_index + 1, right.key(0))
        if key >= right.key(0):
            spine.set_current(sib_loc, right)

    def _free_space(self, location: int) -> int:
        node = self._read(location)
        return node.max_entries - node.nr_entries

    def _rebalance_or_split(self, spine: _Spine, vt: ValueType, parent_index: int,
                            key: int) -> None:
        _, parent = spine.parent
        nr_parent = parent.nr_entries
        left_shared = right_shared = False
        if parent_index > 0:
            left_b = parent.child(parent_index - 1)
            left_shared = self.tm.is_shared(left_b)
            if not left_shared and self._free_space(left_b) >= SPACE_THRESHOLD:
                self._rebalance_left(spine, vt, parent_index, key)
                return
        if parent_index < nr_parent - 1:
            right_b = parent.child(parent_index + 1)
            right_shared = self.tm.is_shared(right_b)
            if not right_shared and self._free_space(right_b) >= SPACE_THRESHOLD:
                self._rebalance_right(spine, vt, parent_index, key)
                return
        if (left_shared or right_shared or nr_parent <= 2 or parent_index == 0
                or parent_index + 1 == nr_parent):
            self._split_one_into_two(spine, parent_index, key)
        else:
            self._split_two_into_three(spine, parent_index, vt, key)

    # -- removal -----------------------------------------------------------------------------
    def remove(self, root: int, keys: list[int] | int) -> int:
        """Remove the entry for `keys`; returns the new root. Raises KeyError if absent."""
        keys = [keys] if isinstance(keys, int) else keys
        spine = _Spine(self)
        last = self.levels - 1
        index = 0
        for level in range(self.levels):
            vt = self.value_type if level == last else self.le64_type
            index = self._remove_raw(spine, vt, root, keys[level], index)
            _, node = spine.current
            if level != last:
                root = node.child(index)
                continue
            if self.value_type.dec is not None:
                self.value_type.dec(node.value(index), 1)
            node.delete_at(index)
        return spine.root

    def _remove_raw(self, spine: _Spine, vt: ValueType, root: int, key: int, index: int) -> int:
        i = index
        while True:
            spine.step(root, vt)
            location, node = spine.current
            if spine.has_parent:
                spine.parent[1].set_child(i, location)
            if node.is_leaf:
                return self._leaf_index(node, key)
            self._rebalance_children(spine, vt, key)
            location, node = spine.current
            if node.is_leaf:
                return self._leaf_index(node, key)
            i = node.lower_bound(key)
            root = node.child(i)

    @staticmethod
    def _leaf_index(node: Node, key: int) -> int:
        i = node.lower_bound(key)
        if i < 0 or i >= node.nr_entries or node.key(i) != key:
            raise KeyError(key)
        return i

    def _rebalance_children(self, spine: _Spine, vt: ValueType, key: int) -> None:
        location, node = spine.current
        if node.nr_entries == 1:
            child = node.child(0)
            data = self.tm.read(child, BTREE_NODE)
            node.buf[:] = data
            self.tm.dec(child)
            spine.set_current(location, Node(node.buf))
            return
        i = node.lower_bound(key)
        if i < 0:
            raise KeyError(key)
        has_left = i > 0
        has_right = i < node.nr_entries - 1
        if not has_left:
            self._rebalance2(node, vt, i)
        elif not has_right:
            self._rebalance2(node, vt, i - 1)
        else:
            self._rebalance3(node, vt, i - 1)

    @staticmethod
    def _merge_threshold(node: Node) -> int:
        return node.max_entries // 3

    @staticmethod
    def _node_shift(node: Node, shift: int) -> None:
        n = node.nr_entries
        if shift < 0:
            copy_entries(node, 0, node, -shift, n + shift)
        else:
            copy_entries(node, shift, node, 0, n)

    @staticmethod
    def _node_copy(left: Node, right: Node, shift: int) -> None:
        nr_left = left.nr_entries
        if shift < 0:
            copy_entries(left, nr_left, right, 0, -shift)
        else:
            copy_entries(right, 0, left, nr_left - shift, shift)

    def _shift(self, left: Node, right: Node, count: int) -> None:
        nr_left, nr_right = left.nr_entries, right.nr_entries
        if not count:
            return
        if count > 0:
            self._node_shift(right, count)
            self._node_copy(left, right, count)
        else:
            self._node_copy(left, right, count)
            self._node_shift(right, count)
        left.nr_entries = nr_left - count
        right.nr_entries = nr_right + count

    def _rebalance2_nodes(self, parent: Node, left_loc: int, left: Node, right_index: int,
                          right_loc: int, right: Node) -> None:
        nr_left, nr_right = left.nr_entries, right.nr_entries
        # Linux >= 5.11 (commit "dm btree: increase rebalance threshold in __rebalance2()"):
        # after a redistribution each child keeps at least max_entries / 3 + 1 entries, so
        # the removal that follows cannot take it under a third.
        threshold = 2 * (self._merge_threshold(left) + 1)
        if nr_left + nr_right < threshold:
            self._node_copy(left, right, -nr_right)
            left.nr_entries = nr_left + nr_right
            parent.delete_at(right_index)
            self.tm.dec(right_loc)
        else:
            target_left = (nr_left + nr_right) // 2
            self._shift(left, right, nr_left - target_left)
            parent.set_key(right_index, right.key(0))

    def _rebalance2(self, parent: Node, vt: ValueType, left_index: int) -> None:
        left_loc, left = self._shadow_child(parent, left_index, vt)
        right_loc, right = self._shadow_child(parent, left_index + 1, vt)
        self._rebalance2_nodes(parent, left_loc, left, left_index + 1, right_loc, right)

    def _rebalance3(self, parent: Node, vt: ValueType, left_index: int) -> None:
        left_loc, left = self._shadow_child(parent, left_index, vt)
        center_loc, center = self._shadow_child(parent, left_index + 1, vt)
        right_loc, right = self._shadow_child(parent, left_index + 2, vt)
        nr_left, nr_center, nr_right = left.nr_entries, center.nr_entries, right.nr_entries
        threshold = self._merge_threshold(left) * 4 + 1
        if nr_left + nr_center + nr_right < threshold:
            # delete the center node: as many entries as fit go left, the rest right
            max_entries = left.max_entries
            shift = min(max_entries - nr_left, nr_center)
            self._node_copy(left, center, -shift)
            left.nr_entries = nr_left + shift
            if shift != nr_center:
                shift = nr_center - shift
                self._node_shift(right, shift)
                self._node_copy(center, right, shift)
                right.nr_entries = nr_right + shift
            parent.set_key(left_index + 2, right.key(0))
            parent.delete_at(left_index + 1)
            self.tm.dec(center_loc)
            self._rebalance2_nodes(parent, left_loc, left, left_index + 1, right_loc, right)
            return
        total = nr_left + nr_center + nr_right
        target_right = total // 3
        remainder = 1 if target_right * 3 != total else 0
        target_left = target_right + remainder
        if nr_left < nr_right:
            s = nr_left - target_left
            if s < 0 and nr_center < -s:
                self._shift(left, center, -nr_center)
                s += nr_center
                self._shift(left, right, s)
                nr_right += s
            else:
                self._shift(left, center, s)
            self._shift(center, right, target_right - nr_right)
        else:
            s = target_right - nr_right
            if s > 0 and nr_center < s:
                self._shift(center, right, nr_center)
                s -= nr_center
                self._shift(left, right, s)
                nr_left -= s
            else:
                self._shift(center, right, s)
            self._shift(left, center, nr_left - target_left)
        parent.set_key(left_index + 1, center.key(0))
        parent.set_key(left_index + 2, right.key(0))

    # -- deletion of a whole tree ------------------------------------------------------------
    def delete(self, root: int) -> None:
        """Drop a reference to a whole tree: shared nodes are just decremented; unshared ones
        release their children (or values) recursively (the kernel's dm_btree_del)."""
        # stack entries: [location, node, level, next child]
        stack: list[list] = []

        def push(location: int, level: int) -> None:
            if len(stack) >= MAX_DEPTH - 1:
                raise MetadataError("btree deeper than 64 levels (cycle?)", block=location)
            if self.tm.ref(location) > 1:
                self.tm.dec(location)
                return
            stack.append([location, self._read(location), level, 0])

        push(root, 0)
        while stack:
            frame = stack[-1]
            location, node, level, current = frame
            n = node.nr_entries
            if current >= n:
                stack.pop()
                self.tm.dec(location)
                continue
            if node.is_internal:
                frame[3] += 1
                push(node.child(current), level)
            elif level < self.levels - 1:
                frame[3] += 1
                push(node.child(current), level + 1)
            else:
                if self.value_type.dec is not None:
                    self.value_type.dec(node.values(0, n), n)
                stack.pop()
                self.tm.dec(location)
