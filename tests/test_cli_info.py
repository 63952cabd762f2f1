"""`sage-fast info` names the path every public op takes on every device it sees."""
from sage_fast import ops
from sage_fast.commands.info import report


def test_every_public_op_has_its_path_reported():
    public = [name for name in ops.__all__ if not name.endswith("_reference")]
    text = report()
    paths = text.split("op paths:")[1]
    for name in public:
        assert f"  {name} " in paths, f"{name} is missing from sage-fast info's op paths"
