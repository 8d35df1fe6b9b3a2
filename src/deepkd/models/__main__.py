"""``python -m deepkd.models [pattern]``: print the model table (name, parameters, dataset, input size)."""
import sys

from deepkd.models import format_model_table


def main(argv=None) -> int:
    """Print the table of registered models matching the optional shell pattern ``argv[0]``."""
    args = sys.argv[1:] if argv is None else argv
    table = format_model_table(args[0] if args else None)
    print(table)
    return 0 if table.count("\n") else 1  # header only: the pattern matched nothing


if __name__ == "__main__":
    sys.exit(main())
