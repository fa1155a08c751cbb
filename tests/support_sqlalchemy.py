"""SQLAlchemy engines on the test database, through the psycopg 3 driver."""

from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL


def sqlalchemy_url(conninfo: str) -> URL:
    """The test database's conninfo (a URL or key=value pairs) as a postgresql+psycopg URL."""
    params = {k: str(v) for k, v in conninfo_to_dict(conninfo).items()}
    port = params.pop("port", None)
    return URL.create("postgresql+psycopg", username=params.pop("user", None), password=params.pop("password", None),
                      host=None, port=int(port) if port else None, database=params.pop("dbname", None),
                      query=params)  # host (a socket directory or a name) goes in the query, as libpq takes it
