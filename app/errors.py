"""User-facing errors: one line naming the field and the fix; the CLI prints them without a traceback."""


class UserError(ValueError):
    """A mistake the user can fix (config, data, request, world size). Its message is a single line."""


class ConfigError(UserError):
    """Bad configuration: unknown key, bad value, impossible combination."""


class DataError(UserError):
    """Missing or unusable data: bad source path, empty corpus, unprepared folder, mismatched tokenizer."""


class FitError(UserError):
    """A scaling fit the data cannot support: too few runs, non-positive or missing values, no usable columns."""


class PlanError(UserError):
    """A training plan that cannot be made: unknown instance type, a budget out of range, no productive time."""
