//! The running pipeline: connectors built from the configuration, the engine over the SQLite
//! store and queue, the HTTP server, N worker tasks and the catch-up scheduler, with a
//! graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dualwrite_connectors::{
    DataverseConfig, DataverseConnector, EntitySchemas, EntraConfig, EntraTokenProvider, FnoConfig,
    FnoConnector, TokenSource,
};
use dualwrite_core::Side;
use dualwrite_core::ports::{Connector, QueueDepth, WorkQueue};
use dualwrite_engine::{Engine, StatsSnapshot, SystemClock, WorkerConfig, run_worker};
use dualwrite_receivers::{Coverage, ReceiverConfig};
use dualwrite_sqlite::{QueueConfig, SqliteQueue, SqliteStore};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info};

use crate::config::{Config, Environment};
use crate::scheduler::run_scheduler;
use crate::server::{AppState, router};

/// The web API path of Dataverse under the environment URL.
pub const DATAVERSE_API_PATH: &str = "/api/data/v9.2";

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened.
    #[error("cannot open the database {path}: {message}; check the `db` path and its folder")]
    Database {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// A connector could not be built.
    #[error("cannot set up the {side} connector for {url}: {message}")]
    Connector {
        /// `dataverse` or `fno`.
        side: &'static str,
        /// The environment URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; pick a free port in `listen`")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What `GET /status` answers and [`RuntimeHandle::stats`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RuntimeStats {
    /// Engine counters.
    pub engine: StatsSnapshot,
    /// Queue counts.
    pub queue: QueueCounts,
    /// Receiver counters.
    pub receivers: ReceiverCounts,
}

/// Queue counts ([`QueueDepth`] as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueCounts {
    /// Deliverable now.
    pub ready: u64,
    /// Being processed.
    pub in_flight: u64,
    /// Waiting for a retry delay.
    pub delayed: u64,
    /// Dead-lettered.
    pub dead: u64,
}

impl From<QueueDepth> for QueueCounts {
    fn from(d: QueueDepth) -> Self {
        QueueCounts {
            ready: d.ready,
            in_flight: d.in_flight,
            delayed: d.delayed,
            dead: d.dead,
        }
    }
}

/// Receiver counters (the receivers' snapshot as JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ReceiverCounts {
    /// Events queued (202).
    pub accepted: u64,
    /// Uncovered entities (200).
    pub ignored: u64,
    /// 401s.
    pub rejected_unauthorized: u64,
    /// 413s.
    pub rejected_too_large: u64,
    /// 400s.
    pub rejected_malformed: u64,
    /// 503s.
    pub rejected_queue_unavailable: u64,
}

/// Shared parts of a running pipeline.
pub(crate) struct Shared {
    pub engine: Arc<Engine>,
    pub queue: Arc<SqliteQueue>,
    pub store: Arc<SqliteStore>,
    pub receiver: Arc<ReceiverConfig>,
    /// Where receivers and the scheduler send events: the queue, behind key-lookup completion.
    pub inbound: Arc<dyn WorkQueue>,
    pub crm: Arc<dyn Connector>,
    pub erp: Arc<dyn Connector>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("engine", &self.engine)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) async fn stats(&self) -> RuntimeStats {
        let depth = self.queue.depth().await.unwrap_or_default();
        let r = self.receiver.stats.snapshot();
        RuntimeStats {
            engine: self.engine.stats(),
            queue: depth.into(),
            receivers: ReceiverCounts {
                accepted: r.accepted,
                ignored: r.ignored,
                rejected_unauthorized: r.rejected_unauthorized,
                rejected_too_large: r.rejected_too_large,
                rejected_malformed: r.rejected_malformed,
                rejected_queue_unavailable: r.rejected_queue_unavailable,
            },
        }
    }
}

/// Starts the local pipeline. See [`Runtime::start`].
#[derive(Debug, Clone, Copy)]
pub struct Runtime;

/// A running pipeline: its address, its counters, and the way to stop it.
#[derive(Debug)]
pub struct RuntimeHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop_http: Option<tokio::sync::oneshot::Sender<()>>,
    stop_workers: watch::Sender<bool>,
    server: JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
    scheduler: Option<JoinHandle<()>>,
}

impl Runtime {
    /// Opens the store and queue, builds the connectors (Entra tokens per environment scope),
    /// binds the listen address and starts the server, the workers and the scheduler.
    ///
    /// # Errors
    /// [`StartError`] naming what could not be set up.
    pub async fn start(config: Config) -> Result<RuntimeHandle, StartError> {
        if let Some(parent) = config.db.parent()
            && !parent.as_os_str().is_empty()
        {
            let _ = std::fs::create_dir_all(parent);
        }
        let db_err = |e: &dyn std::fmt::Display| StartError::Database {
            path: config.db.display().to_string(),
            message: e.to_string(),
        };
        let store = Arc::new(SqliteStore::open(&config.db).map_err(|e| db_err(&e))?);
        let queue = Arc::new(
            SqliteQueue::open(
                &config.db,
                QueueConfig {
                    max_attempts: config.worker.max_attempts,
                    ..QueueConfig::default()
                },
            )
            .map_err(|e| db_err(&e))?,
        );
        let crm: Arc<dyn Connector> = Arc::new(crate::enrich::KeyLookupConnector {
            inner: Arc::new(build_dataverse(&config)?),
            maps: config.maps.clone(),
        });
        let erp: Arc<dyn Connector> = Arc::new(build_fno(&config)?);
        let worker_config = WorkerConfig {
            lease: config.worker.visibility_timeout,
            idle_poll: Duration::from_millis(20),
            ..WorkerConfig::default()
        };
        let engine = Arc::new(Engine::new(
            store.clone(),
            crm.clone(),
            erp.clone(),
            config.maps.clone(),
            Arc::new(SystemClock),
            worker_config,
        ));
        let receiver = Arc::new(ReceiverConfig::new(
            config.dataverse_auth.clone(),
            config.fno_auth.clone(),
            Coverage::from_maps(&config.maps),
        ));
        let inbound: Arc<dyn WorkQueue> = Arc::new(crate::enrich::KeyLookupQueue {
            inner: queue.clone(),
            crm: crm.clone(),
            maps: config.maps.clone(),
        });
        let shared = Arc::new(Shared {
            engine,
            inbound,
            queue,
            store,
            receiver,
            crm,
            erp,
        });

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let (stop_http, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app = router(AppState {
            shared: shared.clone(),
        });
        let server = tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = result {
                error!(error = %e, "webhook server stopped with an error");
            }
        });

        let (stop_workers, stop_workers_rx) = watch::channel(false);
        let workers = (0..config.worker.concurrency)
            .map(|n| {
                let shared = shared.clone();
                let rx = stop_workers_rx.clone();
                tokio::spawn(async move {
                    loop {
                        match run_worker(shared.queue.as_ref(), &shared.engine, rx.clone()).await {
                            Ok(_) => break,
                            Err(e) => {
                                error!(worker = n, error = %e, "worker failed on the queue; restarting in 1 s");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                if *rx.borrow() {
                                    break;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        let scheduler = config.catch_up.clone().map(|catch_up| {
            let shared = shared.clone();
            let rx = stop_workers_rx.clone();
            tokio::spawn(async move { run_scheduler(shared, catch_up, rx).await })
        });
        info!(%addr, maps = config.maps.len(), workers = config.worker.concurrency, "dualwrite runtime started");
        Ok(RuntimeHandle {
            addr,
            shared,
            stop_http: Some(stop_http),
            stop_workers,
            server,
            workers,
            scheduler,
        })
    }
}

impl RuntimeHandle {
    /// The address the webhook endpoints listen on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Engine, queue and receiver counters now.
    pub async fn stats(&self) -> RuntimeStats {
        self.shared.stats().await
    }

    /// The engine (its maps and counters).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.shared.engine
    }

    /// The state store (links, conflicts, errors, map states).
    pub fn store(&self) -> &Arc<SqliteStore> {
        &self.shared.store
    }

    /// The work queue.
    pub fn queue(&self) -> &Arc<SqliteQueue> {
        &self.shared.queue
    }

    /// The connector of `side`.
    pub fn connector(&self, side: Side) -> &Arc<dyn Connector> {
        match side {
            Side::Crm => &self.shared.crm,
            Side::Erp => &self.shared.erp,
        }
    }

    /// Runs one catch-up poll now (what the scheduler does on its schedule); returns how many
    /// changes were ingested.
    ///
    /// # Errors
    /// The first connector, store or queue failure, as text.
    pub async fn catch_up_now(&self) -> Result<usize, String> {
        crate::scheduler::catch_up(&self.shared).await
    }

    /// Stops gracefully: the server stops accepting and finishes open requests, the workers
    /// finish the deliveries in hand, then everything stops. Queued events stay in the
    /// database for the next start.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop_http.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
        let _ = self.stop_workers.send(true);
        for w in self.workers.drain(..) {
            let _ = w.await;
        }
        if let Some(s) = self.scheduler.take() {
            let _ = s.await;
        }
        info!(addr = %self.addr, "dualwrite runtime stopped");
    }
}

fn token_provider(
    env: &Environment,
    side: &'static str,
) -> Result<Arc<dyn TokenSource>, StartError> {
    let mut entra = EntraConfig::new(&env.tenant, &env.client_id, env.client_secret.clone());
    entra.authority.clone_from(&env.authority);
    EntraTokenProvider::new(entra, Arc::default())
        .map(|p| Arc::new(p) as Arc<dyn TokenSource>)
        .map_err(|e| StartError::Connector {
            side,
            url: env.url.clone(),
            message: e.to_string(),
        })
}

fn build_dataverse(config: &Config) -> Result<DataverseConnector, StartError> {
    let env = &config.dataverse;
    let tokens = token_provider(env, "dataverse")?;
    let schemas = Arc::new(EntitySchemas::from_maps(&config.maps, Side::Crm));
    let dv = DataverseConfig::new(format!("{}{DATAVERSE_API_PATH}", env.url), tokens, schemas);
    DataverseConnector::new(dv).map_err(|e| StartError::Connector {
        side: "dataverse",
        url: env.url.clone(),
        message: e.to_string(),
    })
}

fn build_fno(config: &Config) -> Result<FnoConnector, StartError> {
    let env = &config.fno;
    let tokens = token_provider(env, "fno")?;
    let schemas = Arc::new(EntitySchemas::from_maps(&config.maps, Side::Erp));
    FnoConnector::new(FnoConfig::new(env.url.clone(), tokens, schemas)).map_err(|e| {
        StartError::Connector {
            side: "fno",
            url: env.url.clone(),
            message: e.to_string(),
        }
    })
}
