"""One check per registered module: ``checks/<module name>.py`` holds ``verify(module, ctx) -> ModuleReport``,
which the module class's ``verify`` delegates to. Each checks the module's graphs the bundle has
against transformers, the bundle first (its sessions then released), the reference after."""
