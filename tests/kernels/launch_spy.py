"""Records the keyword arguments of a Triton kernel's launches (which variant a launcher picked)."""


class LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch
