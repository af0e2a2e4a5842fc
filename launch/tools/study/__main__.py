import sys

from launch import quiet

quiet.install()  # before launch.config and launch.metrics import Megatron-Core

from launch.tools.study.cli import main  # noqa: E402

sys.exit(main())
