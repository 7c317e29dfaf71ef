"""vlmsafe's bundled assets, installed as the package ``vlmsafe_assets`` (see ``vlmsafe.resources``)."""
