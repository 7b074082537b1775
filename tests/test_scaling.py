"""Cost that must not grow with the directory (issue 4): counted in SQLite
virtual-machine instructions, which are deterministic, instead of timed."""

import scim_appliance
from scim_appliance import GROUP, USER, URN_PATCH

BASE = "https://scim.example.com/scim"


def make_users(store, count, prefix):
    return [scim_appliance.create_resource(store, USER, {"userName": "%s%d@example.com" % (prefix, i)},
                                           BASE)["id"] for i in range(count)]


def vm_steps(store, action):
    """SQLite VM instructions (in units of 100) spent by `action()` on this thread's connection."""
    steps = [0]

    def count():
        steps[0] += 1
        return 0

    conn = store._connection()
    conn.set_progress_handler(count, 100)
    try:
        action()
    finally:
        conn.set_progress_handler(None, 100)
    return steps[0]


def members_patch(op, member_ids):
    """The parsed operations of a PATCH that adds or removes `member_ids`."""
    return scim_appliance.read_patch_request({"schemas": [URN_PATCH], "Operations": [
        {"op": op, "path": "members", "value": [{"value": m} for m in member_ids]}]})


def patch_members(store, group_id, op, member_id):
    operations = members_patch(op, [member_id])
    return lambda: scim_appliance.patch_resource(store, GROUP, group_id, operations, BASE)


def test_member_add_and_remove_cost_does_not_grow_with_the_group(store):
    """A PATCH adding or removing one member costs the same in a group of 10
    as in a group of 3,000 (it once rewrote the group's id, making SQLite
    check every member row)."""
    small = scim_appliance.create_resource(store, GROUP, {"displayName": "small"}, BASE)["id"]
    large = scim_appliance.create_resource(store, GROUP, {"displayName": "large"}, BASE)["id"]
    filler = make_users(store, 3000, "filler")
    for group_id, members in ((small, filler[:10]), (large, filler)):
        for start in range(0, len(members), 500):
            scim_appliance.patch_resource(store, GROUP, group_id, members_patch("add", members[start:start + 500]),
                                          BASE)
    newcomer = make_users(store, 1, "new")[0]
    add_small = vm_steps(store, patch_members(store, small, "add", newcomer))
    add_large = vm_steps(store, patch_members(store, large, "add", newcomer))
    remove_small = vm_steps(store, patch_members(store, small, "remove", newcomer))
    remove_large = vm_steps(store, patch_members(store, large, "remove", newcomer))
    assert add_large <= 1.5 * add_small + 5, (add_small, add_large)
    assert remove_large <= 1.5 * remove_small + 5, (remove_small, remove_large)


def test_group_read_without_members_does_not_touch_them(store):
    """GET /Groups/{id}?excludedAttributes=members costs the same for a group of 3,000 as for an empty one."""
    empty = scim_appliance.create_resource(store, GROUP, {"displayName": "empty"}, BASE)["id"]
    full = scim_appliance.create_resource(store, GROUP, {"displayName": "full"}, BASE)["id"]
    members = make_users(store, 3000, "m")
    for start in range(0, len(members), 500):
        scim_appliance.patch_resource(store, GROUP, full, members_patch("add", members[start:start + 500]), BASE)
    projection = scim_appliance.Projection(GROUP, excluded=["members"])
    read = lambda group_id: lambda: scim_appliance.get_resource(store, GROUP, group_id, BASE, projection)
    assert vm_steps(store, read(full)) <= 1.5 * vm_steps(store, read(empty)) + 5
