"""The one adapter to the Kubernetes API: the kubernetes client's transport and config loading.

pyflannel asks the client for raw responses and reads only the fields it needs, so no typed
V1Node objects are built (they cost about 43 KiB a node) and a watch is read line by line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0


class ApiError(Exception):
    """An API request that failed: an HTTP status (0 for a transport error) and the server's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _message(exc: Exception) -> ApiError:
    status = getattr(exc, "status", 0) or 0
    body = getattr(exc, "body", None)
    if body:
        try:
            return ApiError(status, json.loads(body)["message"])
        except (ValueError, KeyError, TypeError):
            pass
    reason = getattr(exc, "reason", None)
    return ApiError(status, "%s %s" % (status, reason) if status else str(exc))


class KubeClient:
    """Node and pod requests against the API server, with the client's config and auth."""

    def __init__(self, kube_api_url: str = "", kubeconfig_file: str = "") -> None:
        from kubernetes.client.api_client import ApiClient
        from kubernetes.client.configuration import Configuration

        cfg = Configuration()
        try:
            if not kube_api_url and not kubeconfig_file:
                log.warning("Neither --kubeconfig nor --master was specified.  Using the inClusterConfig.  This might not work.")
                from kubernetes.config.incluster_config import load_incluster_config

                # try_refresh_token re-reads the rotating service-account token.
                load_incluster_config(client_configuration=cfg, try_refresh_token=True)
            elif kubeconfig_file:
                from kubernetes.config.kube_config import load_kube_config

                load_kube_config(config_file=kubeconfig_file, client_configuration=cfg, persist_config=False)
        except Exception as exc:  # the loaders raise ConfigException, OSError, YAML errors
            raise ApiError(0, "fail to create kubernetes config: %s" % exc) from exc
        if kube_api_url:
            cfg.host = kube_api_url.rstrip("/")
        self.host = cfg.host
        self._api = ApiClient(cfg)

    def _call(self, method: str, path: str, query: list[tuple[str, Any]] | None = None,
              body: Any = None, content_type: str | None = None, read_timeout: float = REQUEST_TIMEOUT) -> Any:
        """Send a request; the raw urllib3 response of a 2xx answer, else ApiError."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            method, url, headers, body, _ = self._api.param_serialize(
                method, path, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"])
            resp = self._api.call_api(method, url, header_params=headers, body=body,
                                      _request_timeout=(CONNECT_TIMEOUT, read_timeout)).response
        except Exception as exc:  # ApiException, urllib3 errors, socket errors
            raise _message(exc) from exc
        if not 200 <= resp.status < 300:
            try:
                message = json.loads(resp.data)["message"]
            except (ValueError, KeyError, TypeError):
                message = "%d %s" % (resp.status, resp.reason)
            finally:
                resp.release_conn()
            raise ApiError(resp.status, message)
        return resp

    def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        resp = self._call(method, path, **kw)
        try:
            return json.loads(resp.data)
        except ValueError as exc:
            raise ApiError(resp.status, "invalid JSON from the API server: %s" % exc) from exc
        finally:
            resp.release_conn()

    def list_nodes(self, limit: int, cont: str = "") -> dict[str, Any]:
        """One page of the node list."""
        query: list[tuple[str, Any]] = [("limit", limit)]
        if cont:
            query.append(("continue", cont))
        return self._json("GET", "/api/v1/nodes", query=query)

    def watch_nodes(self, resource_version: str, timeout_seconds: int) -> Iterator[dict[str, Any]]:
        """The watch events after ``resource_version``, one dict each, until the server ends the stream.

        The read timeout exceeds the server-side timeout, so a dead connection cannot hang the watch.
        """
        query = [("watch", "true"), ("resourceVersion", resource_version), ("allowWatchBookmarks", "true"),
                 ("timeoutSeconds", timeout_seconds)]
        resp = self._call("GET", "/api/v1/nodes", query=query, read_timeout=timeout_seconds + 30)
        try:
            pending = b""
            for chunk in resp.stream(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
            if pending.strip():
                yield json.loads(pending)
        except ValueError as exc:
            raise ApiError(0, "invalid watch event: %s" % exc) from exc
        except Exception as exc:  # urllib3 read errors and timeouts
            raise _message(exc) from exc
        finally:
            # A watch is left mid-stream; its connection cannot go back to the pool.
            resp.close()

    def patch_node_status(self, name: str, patch: dict[str, Any]) -> None:
        """A strategic-merge patch of ``nodes/<name>/status``."""
        self._json("PATCH", "/api/v1/nodes/%s/status" % name, body=patch,
                   content_type="application/strategic-merge-patch+json")

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The pod object."""
        return self._json("GET", "/api/v1/namespaces/%s/pods/%s" % (namespace, name))
