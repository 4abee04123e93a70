"""vlhub's config groups; importing the package (Hydra does, to compose them) registers the resolvers they use."""

import vlhub.config_resolvers  # noqa: F401
